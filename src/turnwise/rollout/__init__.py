"""What training, evaluation and verification all run: the agent contract, the three
dispatchers (in-process, HTTP push, pull workers), task files, and the runtime built from a config."""
