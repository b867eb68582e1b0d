"""vLLM's offline engine with automatic prefix caching (``pip install 'parlay[vllm]'``, GPU).

Each ``complete`` call (``act``, for game turns) hands the whole batch to ``LLM.chat``; vLLM
schedules it continuously and reuses the cached prefix of every conversation. One sampling seed per request keeps play
reproducible on one GPU setup.

Not yet run on a GPU by this project: treat throughput claims about it as unmeasured.
"""

from __future__ import annotations

from parlay.agents.base import AgentError, ModelAgent, Prompt, Reply, Sampling
from parlay.agents.models import resolve


class VLLMAgent(ModelAgent):
    def __init__(self, model: str, sampling: Sampling | None = None, **engine_args: str) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise AgentError("the vllm backend needs vLLM: pip install 'parlay[vllm]' (on a GPU machine)") from None
        self.sampling = sampling or Sampling()
        args = {k: _number(v) for k, v in engine_args.items()}
        args.setdefault("enable_prefix_caching", True)
        try:
            self.llm = LLM(model=resolve(model), **args)
        except Exception as exc:
            raise AgentError(f"vLLM could not load {model!r}: {exc}") from None
        self.spec = f"vllm:{model}"

    def complete(self, prompts: list[Prompt]) -> list[Reply]:
        from vllm import SamplingParams

        s = self.sampling
        params = [
            SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=r.seed % (2**31))
            for r in prompts
        ]
        outputs = self.llm.chat([r.messages for r in prompts], params, use_tqdm=False)
        return [Reply(o.outputs[0].text.strip(), tokens=len(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        """Drop the engine so that training can have the GPU's memory (the loop closes the round's
        player before it trains)."""
        import gc

        self.llm = None
        gc.collect()
        try:
            import torch

            torch.cuda.empty_cache()
        except ImportError:
            pass


def _number(value: str) -> int | float | bool | str:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)
