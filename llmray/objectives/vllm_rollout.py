"""Rollouts on vLLM (rl.rollout.engine: vllm): `Generator`'s interface (load, generate, probe) over `vllm.LLM`, in
Ray actors of their own with a GPU each, on nodes where vLLM is installed.

Weights go in through vLLM's `load_weights` (Hugging Face names, as TRL's colocated GRPO syncs them); for LoRA the
update's adapters are merged into this actor's copy of the base weights they adapt (read once from the model
folder), as llmray's own generator does. The parity probe reads vLLM's prompt log-probabilities of the same fixed
sequence. Not run by the CPU test suite (vLLM needs a GPU); issue 32's GPU script is where it is measured.
"""

from __future__ import annotations

import glob
import os

import ray
import torch

from llmray.errors import LlmrayError
from llmray.objectives.rollout import merged, probe_ids
from llmray.serve.engine import Rollout
from llmray.serve.sampling import Sampling


class VllmUnavailable(LlmrayError):
    pass


class VllmGenerator:
    """An offline `vllm.LLM` over model.pretrained that loads each update and generates a batch of completions."""

    def __init__(self, model: str, tokenizer: str, max_batch_size: int, device: str | None = None):
        from llmray import storage
        from llmray.data.template import stop_token_ids
        from llmray.data.tokenizer import load_tokenizer

        try:
            import vllm
        except ImportError:
            raise VllmUnavailable("rl.rollout.engine: vllm needs the vllm package on the nodes its generator actors "
                                  "run on (pip install vllm, on GPU nodes); engine: llmray needs nothing more") from None
        if device == "cpu" or not torch.cuda.is_available():
            raise VllmUnavailable("rl.rollout.engine: vllm generates on a GPU; this generator actor has none "
                                  "(set scaling.use_gpu: true)")
        # the weight updates and the probe reach vLLM's worker as functions (LLM.apply_model)
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        self.folder = storage.local_folder(model, "model.pretrained")
        tokenizer_folder = storage.local_folder(tokenizer, "data.tokenizer")
        self.stops = stop_token_ids(load_tokenizer(tokenizer_folder))
        # processed log-probs: after temperature, the distribution the tokens were drawn from (TRL asks the same)
        self.llm = vllm.LLM(model=self.folder, tokenizer=tokenizer_folder, max_num_seqs=max_batch_size, seed=0,
                            logprobs_mode="processed_logprobs", enable_prefix_caching=False)
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = -1
        self.base: dict[str, torch.Tensor] = {}  # LoRA: each adapted layer's base weight

    def get_version(self) -> int:
        return self.version

    def _base_weight(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.base:
            for path in sorted(glob.glob(os.path.join(self.folder, "*.safetensors"))):
                with safe_open(path, "pt") as f:
                    if name in f.keys():
                        self.base[name] = f.get_tensor(name)
                        break
            else:
                raise LlmrayError(f"the LoRA update adapts {name}, which {self.folder}'s safetensors do not hold")
        return self.base[name]

    @torch.no_grad()
    def load(self, update) -> int:
        if update.full is not None:
            weights = list(update.full.items())
        else:
            weights = []
            for name, (a, b, scale) in (update.lora or {}).items():
                weights.append((f"{name}.weight", merged(self._base_weight(f"{name}.weight"), a, b, scale)))
        self.llm.apply_model(lambda model: model.load_weights(iter(weights)))
        self.llm.reset_prefix_cache()
        self.version = update.version
        return self.version

    def generate(self, prompts: list[list[int]], samplings: list[Sampling]) -> list[Rollout]:
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                 top_k=s.top_k if s.top_k > 0 else -1, seed=s.seed,
                                 logprobs=0, stop_token_ids=self.stops) for s in samplings]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        rollouts = []
        for out in outputs:
            done = out.outputs[0]
            tokens = list(done.token_ids)
            rollouts.append(Rollout(tokens, [float(lp[t].logprob) for lp, t in zip(done.logprobs, tokens)],
                                    "length" if done.finish_reason == "length" else "stop"))
        return rollouts

    def release(self) -> None:
        pass  # separate actors only: nothing shares this GPU

    def probe(self) -> list[float]:
        from vllm import SamplingParams

        ids = probe_ids(self.vocab_size)[0].tolist()
        out = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)[0]
        return [float(out.prompt_logprobs[i][ids[i]].logprob) for i in range(1, len(ids))]


VllmGeneratorActor = ray.remote(max_restarts=-1)(VllmGenerator)
