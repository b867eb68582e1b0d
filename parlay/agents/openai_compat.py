"""Any OpenAI-compatible chat endpoint: OpenAI, a vLLM server, ``transformers serve``,
llama.cpp's server.

Requests of a batch run concurrently (bounded by ``concurrency``), each with a timeout; the
openai SDK retries them itself (``max_retries``: exponential backoff with jitter on 408, 409,
429, 5xx, timeouts and dropped connections, honouring a server's ``Retry-After``). A request
that still fails becomes a ``Reply`` with ``error`` set, and the rollout records that game as
failed with the error: nothing is dropped.
"""

from __future__ import annotations

import asyncio
import os
import threading

from parlay.agents.base import AgentError, ModelAgent, Prompt, Reply, Sampling


class OpenAIAgent(ModelAgent):
    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        sampling: Sampling | None = None,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout: float = 60.0,
        max_retries: int = 5,
    ) -> None:
        """``timeout``: seconds per request; ``max_retries``: retries after the first try, the
        SDK's own."""
        try:
            import openai
        except ImportError:
            raise AgentError("the openai backend needs the package openai: pip install openai") from None
        key = api_key or os.environ.get("OPENAI_API_KEY") or ("unused" if base_url else None)
        if key is None:
            raise AgentError("openai:MODEL without @BASE_URL needs OPENAI_API_KEY to be set")
        self.model = model
        self.base_url = base_url
        self.sampling = sampling or Sampling()
        self.concurrency = concurrency
        self._client_args = {"api_key": key, "base_url": base_url, "timeout": timeout, "max_retries": max_retries}
        self._openai = openai
        self.spec = f"openai:{model}" + (f"@{base_url}" if base_url else "")

    def complete(self, prompts: list[Prompt]) -> list[Reply]:
        return _run(self._complete(prompts))

    async def _complete(self, prompts: list[Prompt]) -> list[Reply]:
        client = self._openai.AsyncOpenAI(**self._client_args)
        gate = asyncio.Semaphore(self.concurrency)
        try:
            return await asyncio.gather(*(self._one(client, gate, p) for p in prompts))
        finally:
            await client.close()

    async def _one(self, client, gate: asyncio.Semaphore, prompt: Prompt) -> Reply:
        s = self.sampling

        async def call():
            return await client.chat.completions.create(
                model=self.model,
                messages=prompt.messages,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_new_tokens,
                seed=prompt.seed % (2**31),
            )

        async with gate:
            try:
                resp = await call()
            except Exception as exc:
                return Reply("", error=f"{type(exc).__name__}: {exc}")
        if not resp.choices:
            return Reply("", error="the endpoint returned no choices")
        text = resp.choices[0].message.content or ""
        tokens = resp.usage.completion_tokens if resp.usage else None
        return Reply(text.strip(), tokens=tokens)


def _run(coro):
    """Run a coroutine to the end, also from inside a running event loop (e.g. a web app)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    result: list = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(coro)))
    thread.start()
    thread.join()
    return result[0]
