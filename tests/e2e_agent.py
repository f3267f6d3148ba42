"""A test agent: the support-desk agent's conversation, rewarded by reply length so that every
group has reward variance (a random tiny model rarely earns the real reward in two steps)."""

from typing import Any


async def agent(task: dict[str, Any], client: Any, ctx: Any) -> float:
    messages = [{"role": "user", "content": task["question"]}]
    reply = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
    text = reply.choices[0].message.content or ""
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Thanks. Anything else?"}]
    reply = await client.chat.completions.create(model=ctx.model, messages=messages, **ctx.inference_params)
    return min(1.0, len(text + (reply.choices[0].message.content or "")) / 400)
