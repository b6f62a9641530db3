"""The embedded rollout engine: continuous batching over a slot KV cache, on the trainer's model.

    engine = Engine(model, tokenizer, EngineConfig(max_slots=64, max_len=2048))
    samples = engine.generate([Request("p0", prompt_ids, SamplingParams(temperature=1.0), n_samples=8)])
    engine.update_weights(trainer_model)          # in place; engine.version += 1

Each step (1) admits waiting prompts into free slots and prefills them (a group of n samples is
prefilled once and its cache rows copied to the other members), sampling each member's first
token from the prefill's last logits, then (2) decodes one token for every running sample in
one batched forward. A sample stops at a stop token, a stop string, `max_new_tokens` or the
cache's `max_len`, and frees its slot for the next prompt at the following step: there is no
batch barrier, so short samples never wait for long ones. With static decode (CUDA graphs) and
no prompt waiting for a slot, each decode step is queued before the previous one's tokens reach
the host (one step of lookahead), so the host's per-token bookkeeping overlaps the GPU.

miles runs it in-process on the model object the trainer owns (or one loaded from a path, FP8 /
INT4 via `miles_core.quant`), so rollout numerics are the trainer's numerics and a weight update
is a copy into existing storage (see `weights.py`), or nothing at all when the objects are shared.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from miles_core.errors import MilesError
from miles_core.rollout.cache import KVCache
from miles_core.rollout.numerics import Numerics, check_numerics
from miles_core.rollout.partial import Budget
from miles_core.rollout.runner import StepBatch, forward_step
from miles_core.rollout.sampling import SamplingParams, SamplingTensors, sample
from miles_core.rollout.scheduler import Scheduler
from miles_core.rollout.sequence import Request, Sample
from miles_core.rollout.weights import WeightSource, copy_weights_

__all__ = ["Engine", "EngineConfig"]

_GOLDEN = 0x9E3779B97F4A7C15


class EngineConfig(BaseModel):
    """Engine capacity and behaviour. The cache holds max_slots x max_len positions per layer."""

    model_config = ConfigDict(extra="forbid")

    max_slots: int = Field(64, ge=1, description="samples decoded together (cache slots)")
    max_len: int = Field(4096, ge=2, description="prompt + response positions per slot")
    max_prefill_tokens: int = Field(16384, ge=1, description="padded prompt tokens prefilled per step")
    seed: int = Field(0, description="draws the seeds of requests that give none")
    cuda_graphs: bool = Field(False, description="decode under CUDA graphs (CUDA only; see graphs.py)")
    static_decode: bool = Field(False, description="decode all slots with static shapes (implied by cuda_graphs)")
    graph_len_bucket: int = Field(256, ge=1, description="CUDA graphs: attended length rounded up to this")
    numerics: Numerics = Field("default", description="default | bitwise (batch-invariant, planned; numerics.py)")


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None, eos_token_ids=()):
        """`model`: a model-core CausalLM (possibly with quantized layers); EOS ids come from the
        tokenizer, the model config and `eos_token_ids` (all of them stop unless ignore_eos)."""
        self.config = config or EngineConfig()
        check_numerics(self.config.numerics)
        self.model = model  # not switched to eval(): it may be the trainer's (the model core has no train-only ops)
        self.tokenizer = tokenizer
        self.device = model.lm_head.weight.device
        self.cache = KVCache(model, self.config.max_slots, self.config.max_len, self.device)
        self.scheduler = Scheduler(self.config.max_slots, self.config.max_prefill_tokens)
        self.version = 0
        self._rng = random.Random(self.config.seed)
        self._eos = _eos_ids(tokenizer, model) | {int(e) for e in eos_token_ids}
        self._no_sync = self.device.type == "cuda"  # MoE without bincount's host sync (runner.moe_forward)
        self._graphs = None
        self._st_key, self._st = None, None  # the last SamplingTensors and the samples it was built for
        self._ahead: _Step | None = None  # a decode step queued before its predecessor's tokens were read
        if self.device.type == "cuda":  # decode: q/k/v in one GEMM (parameters become views of one buffer)
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "fuse_projections_"):
                    layer.self_attn.fuse_projections_()
        if self.config.cuda_graphs and self.device.type != "cuda":
            raise MilesError("cuda_graphs needs the model on a CUDA device")
        if self.config.cuda_graphs or self.config.static_decode:
            from miles_core.rollout.graphs import GraphDecoder, capture_blocker

            if self.config.cuda_graphs and (why := capture_blocker(model)):
                raise MilesError(f"cuda_graphs cannot capture this model's decode step: {why}; "
                                 "load it in bf16 or set cuda_graphs=False")  # fmt: skip

            bucket = self.config.graph_len_bucket
            self._graphs = GraphDecoder(model, self.cache, bucket, capture=self.config.cuda_graphs)

    @torch.inference_mode()  # as run(): the graphs must capture the inference-time kernels
    def warmup(self, max_len: int | None = None) -> int:
        """Capture the decode graphs of every attended length up to `max_len` (default the engine's)
        now, as serving engines do at start-up, so that no round pays for captures mid-way; returns
        the number captured (0 without CUDA graphs). Only between rounds (it writes position 0 of
        every slot, which a new prompt rewrites)."""
        if self.scheduler.running:
            raise MilesError("warmup while samples are running; call it between rounds")
        return self._graphs.capture_all(max_len) if self._graphs is not None else 0

    # ---- requests in, samples out -------------------------------------------------------------

    def samples_for(self, requests: list[Request]) -> list[Sample]:
        """One Sample per (request, sample index); per-sample seeds from the request's seed."""
        out = []
        for r in requests:
            if not r.prompt_tokens:
                raise MilesError(f"prompt {r.prompt_id!r} is empty")
            if len(r.prompt_tokens) >= self.config.max_len:
                raise MilesError(
                    f"prompt {r.prompt_id!r} has {len(r.prompt_tokens)} tokens, the engine's max_len is "
                    f"{self.config.max_len}; raise max_len or drop long prompts"
                )
            if r.sampling.stop and self.tokenizer is None:
                raise MilesError("stop strings need a tokenizer: pass one to the Engine")
            base = r.sampling.seed if r.sampling.seed is not None else self._rng.getrandbits(63)
            out += [Sample(r, j, (base + j * _GOLDEN) % 2**63) for j in range(r.n_samples)]
        return out

    def generate(self, requests: list[Request], on_step=None) -> list[Sample]:
        """Run `requests` to completion; samples in request order, then sample index."""
        samples = self.samples_for(requests)
        self.run(samples, None, on_step)
        return samples

    @torch.inference_mode()
    def run(self, samples: list[Sample], budget: Budget | None = None, on_step=None) -> list[Sample]:
        """Serve `samples` (fresh or aborted ones to resume) until done or the budget is spent.

        Returns the unfinished samples, running ones first (status `aborted`, resumable), then the
        ones never started. `on_step(new_tokens: int, finished: list[Sample])` follows progress.
        """
        for s in samples:
            if s.finished:
                raise MilesError(f"sample {s.request.prompt_id}/{s.sample_index} is already {s.status}")
            s.status, s.rounds = None, s.rounds + 1
        self.scheduler.enqueue(samples)
        clock = budget.clock() if budget is not None else None
        try:
            while not self.scheduler.idle:
                n_tokens, finished = self.step()
                if on_step is not None:
                    on_step(n_tokens, finished)
                if clock is not None:
                    clock.spend(n_tokens)
                    if clock.exhausted:
                        break
        except BaseException:
            self._reset()  # an error (OOM, Ctrl-C) must not leave slots taken for the next call
            raise
        finally:
            self._ahead = None  # a step queued for samples that are no longer running: ignored
        aborted = list(self.scheduler.running)
        for s in aborted:
            s.aborts += 1
            self._stop(s, "aborted", "budget")
        waiting = self.scheduler.drain_waiting()
        for s in waiting:
            s.rounds -= 1  # never admitted: this round does not count
        return aborted + waiting

    def _reset(self) -> None:
        for s in list(self.scheduler.running):
            s.status, s.finish_reason = "aborted", "error"
            self.scheduler.release(s)
        self.scheduler.drain_waiting()

    def step(self) -> tuple[int, list[Sample]]:
        """Prefill newly admitted prompts, then decode one token for every running sample."""
        new_tokens, finished = 0, []
        units = self.scheduler.admit()
        if units:
            rows = [(u.tokens, u.samples[0].slot, 0) for u in units]
            batch = StepBatch.build(rows, self.device)
            logits = forward_step(self.model, self.cache, batch, capture_safe=self._no_sync)  # [U, V]
            members, which = [], []
            for i, u in enumerate(units):
                self.cache.copy(u.samples[0].slot, [s.slot for s in u.samples[1:]], len(u.tokens))
                for s in u.samples:
                    s.fed = len(u.tokens)
                    members.append(s)
                    which.append(i)
            finished += self._sample(members, logits[torch.tensor(which, device=logits.device)])
            new_tokens += len(members)
        running = list(self.scheduler.running)
        if running and self._graphs is not None and not self.scheduler.waiting:
            finished += self._decode_ahead(running)  # no admission can change the batch: pipeline
            new_tokens += len(running)
        elif running:
            self._ahead = None
            finished += self._sample(running, self._decode(running))
            new_tokens += len(running)
        return new_tokens, finished

    # ---- one step of lookahead (static decode, nothing waiting) ------------------------------

    def _decode_ahead(self, running: list[Sample]) -> list[Sample]:
        """Decode `running` with the next step already queued behind this one.

        The step's tokens stay on the device as the next step's inputs (`GraphDecoder.advance`),
        so the next step is launched before this one's tokens reach the host, and the host's
        bookkeeping (stops, log-probs) overlaps the device's work. Samples that stop here have a
        row in the next step too; it is ignored (its cache writes land past the sample's end, in
        a slot that a new prompt rewrites from position 0). Nothing is admitted meanwhile, so the
        next step's samples are always among this one's.
        """
        pending, self._ahead = self._ahead, None
        if pending is None or not all(s in pending.members for s in running):
            pending = self._launch(running, 0)
        if not all(self._last_token(s) for s in running):  # unless every sample stops at this token
            self._ahead = self._launch(running, 1)
        if pending.event is not None:
            pending.event.synchronize()
        for s in running:
            s.fed += 1
        tokens, logprobs = pending.host[0].long().tolist(), pending.host[1].tolist()
        return self._record(running, [tokens[s.slot] for s in running], [logprobs[s.slot] for s in running])

    def _last_token(self, s: Sample) -> bool:
        """The token being decoded is certainly the sample's last (max_new_tokens or max_len)."""
        return len(s.response_tokens) + 1 >= s.sampling.max_new_tokens or s.total_len + 1 >= self.config.max_len

    def _launch(self, running: list[Sample], ahead: int) -> _Step:
        """Queue one all-slot decode step and its sampling; `ahead` = 1: the step after the one
        whose tokens are not on the host yet (inputs already on the device), 0: from the host."""
        graphs = self._graphs
        if not ahead:
            graphs.upload([([s.response_tokens[-1]], s.slot, s.fed) for s in running])
        logits = graphs.run(max(s.fed for s in running) + ahead + 1)  # [S, V]
        tokens, logprobs = sample(logits, self._slot_sampling(running, ahead))  # [S] each
        graphs.advance(tokens)
        both = torch.stack([tokens.double(), logprobs.double()])  # [2, S]
        if not both.is_cuda:
            return _Step(set(running), both, None)
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return _Step(set(running), host, event)

    def _slot_sampling(self, running: list[Sample], ahead: int) -> SamplingTensors:
        """Sampling tensors with one row per slot (free slots: greedy placeholders)."""
        by_slot: list[Sample | None] = [None] * self.cache.slots
        for s in running:
            by_slot[s.slot] = s
        steps = [len(s.response_tokens) + ahead if s is not None else 0 for s in by_slot]
        key = ("slots", *by_slot)
        if key == self._st_key:
            return self._st.at_steps(steps)
        params = [s.sampling if s is not None else _PLACEHOLDER for s in by_slot]
        st = SamplingTensors(params, [s.seed if s is not None else 0 for s in by_slot], steps, self.device)
        self._st_key, self._st = key, st
        return st

    def _decode(self, running: list[Sample]) -> torch.Tensor:
        """Feed each running sample its last token -> logits [N, V] in `running` order."""
        rows = [([s.response_tokens[-1]], s.slot, s.fed) for s in running]
        if self._graphs is not None:
            logits = self._graphs.decode(rows)
        else:
            logits = forward_step(
                self.model, self.cache, StepBatch.build(rows, self.device), capture_safe=self._no_sync
            )
        for s in running:
            s.fed += 1
        return logits

    # ---- per-token bookkeeping ----------------------------------------------------------------

    def _sample(self, samples: list[Sample], logits: torch.Tensor) -> list[Sample]:
        """Sample one token per sample from logits [N, V]; append it; stop those that are done."""
        steps = [len(s.response_tokens) for s in samples]
        key = tuple(samples)  # by identity (Sample has eq=False)
        if key == self._st_key:  # the same samples as the last call: only the counters moved
            st = self._st.at_steps(steps)
        else:
            st = SamplingTensors([s.sampling for s in samples], [s.seed for s in samples], steps, self.device)
            self._st_key, self._st = key, st
        tokens, logprobs = sample(logits, st)
        host = torch.stack([tokens.double(), logprobs.double()]).cpu()  # one device-to-host copy per step
        return self._record(samples, host[0].long().tolist(), host[1].tolist())

    def _record(self, samples: list[Sample], tokens: list[int], logprobs: list[float]) -> list[Sample]:
        """Append each sample's new token; stop those that are done; returns the stopped ones."""
        finished = []
        for s, tok, lp in zip(samples, tokens, logprobs, strict=True):
            s.response_tokens.append(tok)
            s.logprobs.append(lp)
            s.versions.append(self.version)
            reason = self._stop_reason(s, tok)
            if reason is not None:
                status = "completed" if reason in ("stop_token", "stop_string") else "truncated"
                self._stop(s, status, reason)
                finished.append(s)
        return finished

    def _stop_reason(self, s: Sample, tok: int) -> str | None:
        p = s.sampling
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self._eos):
            return "stop_token"
        if p.stop and _stop_at(self._tail_text(s, p.stop), p.stop) is not None:
            return "stop_string"
        if len(s.response_tokens) >= p.max_new_tokens:
            return "max_new_tokens"
        if s.total_len >= self.config.max_len:
            return "max_len"
        return None

    def _tail_text(self, s: Sample, stops: list[str]) -> str:
        """The decoded end of the response, long enough to hold any stop string that just completed."""
        n = 4 * max(len(x) for x in stops) + 8
        return self.tokenizer.decode(s.response_tokens[-n:], skip_special_tokens=True)

    def _stop(self, s: Sample, status: str, reason: str) -> None:
        """Read the slot's experts (all positions but the last token), free the slot, set the text."""
        s.experts = self.cache.read_experts(s.slot, s.total_len - 1)
        s.status, s.finish_reason = status, reason
        s.text = self._text(s)
        self.scheduler.release(s)

    def _text(self, s: Sample) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(s.response_tokens, skip_special_tokens=True)
        cut = _stop_at(text, s.sampling.stop) if s.finish_reason == "stop_string" else None
        return text if cut is None else text[:cut]

    # ---- weights ------------------------------------------------------------------------------

    def update_weights(self, source: WeightSource, version: int | None = None) -> int:
        """Take new weights in place: `source` is the trainer's model (shared or copied), a state
        dict or (name, tensor) pairs. Bumps (or sets) the version; returns it. Call between rounds."""
        if self.scheduler.running:
            raise MilesError("update_weights while samples are running; call it between rounds")
        copy_weights_(self.model, source)  # in place: captured graphs stay valid
        self.version = self.version + 1 if version is None else int(version)
        return self.version


@dataclass
class _Step:
    """A queued decode step: the samples it decodes and its [2, S] (token, log-prob) per slot,
    copied to `host` when `event` completes (None: already there)."""

    members: set[Sample]
    host: torch.Tensor
    event: torch.cuda.Event | None


_PLACEHOLDER = SamplingParams(temperature=0.0)  # the sampling of a free slot's ignored row


def _stop_at(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(hits) if hits else None


def _eos_ids(tokenizer, model) -> set[int]:
    """The tokenizer's EOS and the model config's eos_token_id (an int or a list)."""
    found: set[int] = set()
    raw = getattr(model.config, "raw", {}) or {}
    for eos in (getattr(tokenizer, "eos_token_id", None), raw.get("eos_token_id")):
        if isinstance(eos, list | tuple):
            found.update(int(e) for e in eos)
        elif eos is not None:
            found.add(int(eos))
    return found
