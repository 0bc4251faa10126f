"""Model runner: turns a SchedulerOutput into flat tensors, runs the model, samples.

It keeps a small state per running request (its tokens and block ids), updated from what the
scheduler says changed. Per step it builds, on the host and then copies to the device::

    request:         A (decode)    B (prefill chunk, 3 tokens, 5 cached)
    input_ids:       [a9]          [b5 b6 b7]
    positions:       [9]           [5  6  7 ]
    slot_mapping:    [slot(A,9)]   [slot(B,5) slot(B,6) slot(B,7)]   slot = block*bs + pos%bs
    query_start_loc: 0             1                                   4
    seq_lens:        10            8
    logits_indices:  [0]           [3]        (only B's last token samples, if it ends B's prompt)

Decode requests (one query token) are ordered first, as AttentionBatch requires.

Under tensor parallelism every rank runs this same code on its shard of the model; the logits
are gathered whole on every rank and every rank samples, identically (same seed, same ops), so
each keeps its own copy of the tokens. Under pipeline parallelism a stage that is not the first
receives ``(hidden, residual)`` from the previous one, and one that is not the last sends them
on and samples nothing: it learns the sampled tokens from the scheduler (``new_token_ids``).

Steps run asynchronously: ``execute_async`` launches a step and returns a ``StepHandle`` at
once; the sampled ids reach the host through a pinned buffer and an event, read by
``StepHandle.result()``. Under async scheduling the next step is prepared and launched before
that: a request's input token may then be one the device sampled but the host has not seen
(``num_pending``), and it is fed from the previous step's sampled ids on the device::

    step N:    ... sample -> ids_N (device) --copy--> pinned host buffer, event
    step N+1:  input_ids = host ids, with rows of pending tokens <- ids_N[row in N]
               (launched while N runs); then N's handle resolves (event wait, no stream sync)

Only penalties read a request's whole history on the host: a step with them first resolves
every step in flight.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.sampler import Sampler, SamplerOutput, SamplingBatch, seed_for_position
from tessellm.core.step import ModelRunnerOutput, SchedulerOutput
from tessellm.distributed.parallel_state import PipelineStage

logger = logging.getLogger(__name__)


@dataclass
class RunnerRequest:
    request_id: str
    token_ids: list[int]  # prompt + output so far
    num_prompt_tokens: int
    params: object  # SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    row: int = -1  # this request's row in the persistent block table
    prompt_logprobs: list = field(default_factory=list)  # accumulated over prefill chunks
    num_pending: int = 0  # tokens sampled by launched steps, not yet in token_ids

    @property
    def num_tokens(self) -> int:
        """Tokens so far, pending ones included (``token_ids`` lags by ``num_pending``)."""
        return len(self.token_ids) + self.num_pending


class ModelRunner:
    def __init__(self, model, kernel, backend, device: torch.device, block_size: int,
                 vocab_size: int, eos_token_ids: tuple[int, ...] = (), seed: int = 0,
                 max_model_len: int = 2048, graph_runner=None, pp: Optional[PipelineStage] = None,
                 dtype: torch.dtype = torch.float32):
        self.model = model
        self.pp = pp or PipelineStage()
        self.dtype = dtype  # of activations (hidden states sent between stages)
        self.kernel = kernel  # the attention kernel all layers share
        self.backend = backend
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)  # banned before a request's min_tokens
        self.sampler = Sampler(device, seed)
        self.requests: dict[str, RunnerRequest] = {}
        self.max_model_len = max_model_len
        self.tables = PersistentBlockTable(-(-max_model_len // block_size))
        self.graph_runner = graph_runner  # replays captured pure-decode steps; None: eager
        # Pinned host buffers for step inputs, two sets used alternately by launch: a set is
        # written again only after the event recorded once its last step's copies were queued.
        self._staging: dict[tuple[int, int], torch.Tensor] = {}
        self._staging_events: dict[int, object] = {}
        self._readback_pool: list[torch.Tensor] = []  # pinned buffers for sampled ids, free
        self._graphs_ready = False
        self._unresolved: collections.deque[StepHandle] = collections.deque()  # oldest first
        self._last: Optional[StepHandle] = None  # the last launched step that sampled
        self._num_launches = 0

    # -- KV cache --------------------------------------------------------------------------

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """Zero-filled so padded reads are finite. One (k, v) pair of tensors per layer."""
        for attn in self.model.attention_layers():
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_size)
            attn.k_cache = _zeros(shape, dtype, self.device)
            attn.v_cache = _zeros(shape, dtype, self.device)

    def kv_bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return sum(2 * self.block_size * a.num_kv_heads * a.head_size * elem
                   for a in self.model.attention_layers())

    @torch.inference_mode()
    def profile_run(self, num_tokens: int) -> None:
        """One forward at ``num_tokens`` so the allocator reaches its peak before KV sizing.

        The tokens are prompts of at most ``max_model_len`` each, as a real step's are: one
        prompt longer than that would index rotary tables (sized by the model's context) past
        their end."""
        from tessellm.core.sampling_params import SamplingParams

        dtype = self.dtype
        bs = self.block_size
        counts = [min(self.max_model_len, num_tokens - start)
                  for start in range(0, num_tokens, self.max_model_len)]
        states, first_block = [], 0
        for i, n in enumerate(counts):
            blocks = list(range(first_block, first_block + -(-n // bs)))
            first_block += len(blocks)
            states.append(RunnerRequest(f"profile-{i}", [0] * n, n, SamplingParams(max_tokens=1),
                                        blocks, 0))
        self.allocate_kv_cache(first_block, dtype)
        inputs = self._prepare_inputs(states, counts, [0] * len(counts))
        hidden = self.model(inputs.input_ids, inputs.positions, self.kernel.build_metadata(inputs.attn),
                            self._dummy_intermediate(num_tokens))
        if self.pp.is_last:
            self.model.compute_logits(hidden[-min(num_tokens, 256):])
        self.backend.synchronize()
        self.allocate_kv_cache(0, dtype)

    # -- per-step state --------------------------------------------------------------------

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.dropped_request_ids:
            state = self.requests.pop(rid, None)
            if state is not None:
                self.tables.remove(state.row)
        for new in sched.new_requests:
            self.requests[new.request_id] = RunnerRequest(
                new.request_id, list(new.all_token_ids), len(new.prompt_token_ids),
                new.sampling_params, list(new.block_ids), new.num_computed_tokens,
                self.tables.add(new.block_ids))
        for cached in sched.cached_requests:
            state = self.requests[cached.request_id]
            state.block_ids.extend(cached.new_block_ids)
            self.tables.append(state.row, cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens
            if cached.new_token_ids and not self.pp.is_last:  # tokens another stage sampled
                del state.token_ids[cached.num_computed_tokens:]
                state.token_ids.extend(cached.new_token_ids)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step and wait for its results."""
        return self.execute_async(sched).result()

    @torch.inference_mode()
    def execute_async(self, sched: SchedulerOutput) -> "StepHandle":
        """Launch one step; its ``StepHandle.result()`` waits for the sampled tokens."""
        self._update_states(sched)
        order = sorted(sched.num_scheduled_tokens, key=lambda r: sched.num_scheduled_tokens[r] != 1)
        states = [self.requests[r] for r in order]
        counts = [sched.num_scheduled_tokens[r] for r in order]
        out = ModelRunnerOutput({}, {}, {})
        if len(self._unresolved) >= 2 or any(s.params.needs_penalties for s in states):
            self.resolve_all()  # at most two steps in flight; penalties count every output token
        self._num_launches += 1
        padded = self._graph_size(states, counts)
        if padded is not None:
            logits = self._run_graph(states, padded)
            sampling_rows = states
        else:
            inputs = self._prepare_inputs(states, counts, [sched.num_sampled_tokens.get(r, 0) for r in order])
            self._inputs_queued()
            metadata = self.kernel.build_metadata(inputs.attn)
            intermediate = None
            if not self.pp.is_first:
                intermediate = self.pp.recv([(inputs.attn.num_tokens, self._hidden_size)] * 2,
                                            self.dtype, self.device)
            hidden = self.model(inputs.input_ids, inputs.positions, metadata, intermediate)
            if not self.pp.is_last:
                self.pp.send(list(hidden))
                return StepHandle.done(out)
            sampling_rows = [s for s, samples in zip(states, inputs.samples) if samples]
            if inputs.prompt_lp_rows:
                self._prompt_logprobs(hidden, inputs, out)
            if not sampling_rows:
                return StepHandle.done(out)
            logits = self.model.compute_logits(hidden[inputs.logits_indices])
        result = self.sampler(logits, self._sampling_batch(sampling_rows))
        return self._launch_readback(sampling_rows, result, out)

    def resolve_all(self) -> None:
        """Wait for every launched step and put its tokens into the requests' states."""
        while self._unresolved:
            self._unresolved[0].result()

    def _launch_readback(self, rows: list[RunnerRequest], result: SamplerOutput,
                         out: ModelRunnerOutput) -> "StepHandle":
        """Start copying the step's sampled ids (and logprobs) to the host; record an event."""
        n = len(rows)
        event = buffer = None
        if self.device.type == "cpu":
            host = result.token_ids
        else:
            buffer = self._take_readback(n)
            host = buffer[:n]
            host.copy_(result.token_ids, non_blocking=True)
            for name in ("sampled_logprob", "sampled_rank", "topk_ids", "topk_logprobs"):
                value = getattr(result, name)
                if value is not None:
                    setattr(result, name, value.to("cpu", non_blocking=True))
            event = torch.Event(device=self.device)
            event.record()
        for state in rows:
            state.num_pending += 1
        handle = StepHandle(self, rows, result, host, event, out)
        handle.readback = buffer
        self._unresolved.append(handle)
        self._last = handle
        return handle

    def _resolve(self, handle: "StepHandle") -> None:
        while self._unresolved and self._unresolved[0] is not handle:
            self._unresolved[0].result()  # in launch order: tokens append in order
        if handle.event is not None:
            handle.event.synchronize()
        self._collect(handle.rows, handle.sampled, handle.host_ids.tolist(), handle.out)
        for state in handle.rows:
            state.num_pending -= 1
        if self._unresolved and self._unresolved[0] is handle:
            self._unresolved.popleft()
        if handle.readback is not None:
            self._readback_pool.append(handle.readback)
        # ``_last`` keeps its device ids: a feed taken from them stays valid.

    def _input_token(self, state: RunnerRequest, pos: int, row: int,
                     feed: list[tuple[int, int]]) -> int:
        """The input id at ``pos``; for a pending token, 0 and ``(row, row in the last step's
        sampled ids)`` added to ``feed`` (copied on the device)."""
        if pos < len(state.token_ids):
            return state.token_ids[pos]
        last = self._last
        if (last is not None and pos == len(state.token_ids) and state.num_pending == 1
                and state.request_id in last.index):
            feed.append((row, last.index[state.request_id]))
            return 0
        self.resolve_all()  # not the last step's token (not expected): wait for it on the host
        return state.token_ids[pos]

    def _feed(self, input_ids: torch.Tensor, feed: list[tuple[int, int]]) -> torch.Tensor:
        """Copy pending tokens from the last step's sampled ids into ``input_ids`` (device)."""
        if not feed:
            return input_ids
        rows = np.asarray(feed, dtype=np.int64)
        dst = self._to_device(5, np.ascontiguousarray(rows[:, 0]))
        src = self._to_device(6, np.ascontiguousarray(rows[:, 1]))
        input_ids.index_copy_(0, dst, self._last.sampled.token_ids.index_select(0, src))
        return input_ids

    @property
    def _hidden_size(self) -> int:
        return self.model.config.hidden_size

    def _dummy_intermediate(self, num_tokens: int):
        if self.pp.is_first:
            return None
        shape = (num_tokens, self._hidden_size)
        return (torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device))

    # -- graphs ----------------------------------------------------------------------------

    def capture_graphs(self) -> None:
        """Capture the decode step (forward + logits) for each of the graph runner's sizes."""
        if self.graph_runner is None:
            return
        if not getattr(self.kernel, "supports_graph_capture", False):
            logger.warning("Attention kernel %r does not declare supports_graph_capture; running "
                           "eagerly without the backend's graph runner.", self.kernel.name)
            self.graph_runner = None
            return
        width = -(-self.max_model_len // self.block_size)
        self._arange = torch.arange(max(self.graph_runner.capture_sizes) + 1, dtype=torch.int32,
                                    device=self.device)

        def make_inputs(n: int):
            return (torch.zeros(n, dtype=torch.int64, device=self.device),  # input ids
                    torch.zeros(n, dtype=torch.int64, device=self.device),  # positions
                    torch.full((n,), -1, dtype=torch.int64, device=self.device),  # slots
                    torch.ones(n, dtype=torch.int32, device=self.device),  # seq lens
                    torch.zeros((n, width), dtype=torch.int32, device=self.device))  # tables

        with torch.inference_mode():
            self.graph_runner.capture(self._decode_step, make_inputs)
        self._graphs_ready = True

    def _decode_step(self, input_ids, positions, slot_mapping, seq_lens, block_tables):
        n = input_ids.shape[0]
        batch = AttentionBatch(num_tokens=n, num_seqs=n, num_decodes=n,
                               query_start_loc=self._arange[:n + 1], seq_lens=seq_lens,
                               block_tables=block_tables, slot_mapping=slot_mapping,
                               max_query_len=1, max_seq_len=self.max_model_len,
                               query_start_loc_host=[], seq_lens_host=[])
        hidden = self.model(input_ids, positions, self.kernel.build_metadata(batch))
        return self.model.compute_logits(hidden)

    def _graph_size(self, states: list[RunnerRequest], counts: list[int]) -> Optional[int]:
        if not self._graphs_ready or counts[-1] != 1:  # decodes sort first: last is 1 => all
            return None
        if any(s.params.prompt_logprobs is not None for s in states):
            return None
        return self.graph_runner.padded_size(len(states))

    def _run_graph(self, states: list[RunnerRequest], padded: int) -> torch.Tensor:
        """Pad a pure-decode batch to ``padded`` rows (slot -1, length 0) and replay."""
        n, bs = len(states), self.block_size
        rows = np.fromiter((st.row for st in states), dtype=np.int64, count=n)
        computed = np.fromiter((st.num_computed_tokens for st in states), dtype=np.int64, count=n)
        width = int(self.tables.num_blocks[rows].max())  # the graph's table is wider; see run()
        table = np.zeros((padded, width), dtype=np.int32)
        table[:n] = self.tables.table[rows, :width]
        ids = np.zeros(padded, dtype=np.int64)
        feed: list[tuple[int, int]] = []
        ids[:n] = [self._input_token(st, st.num_computed_tokens, i, feed) for i, st in enumerate(states)]
        pos = np.zeros(padded, dtype=np.int64)
        pos[:n] = computed
        slots = np.full(padded, -1, dtype=np.int64)
        slots[:n] = table[np.arange(n), computed // bs].astype(np.int64) * bs + computed % bs
        lens = np.zeros(padded, dtype=np.int32)
        lens[:n] = computed + 1
        for st in states:
            st.num_computed_tokens += 1
        inputs = [self._to_device(i, a) for i, a in enumerate((ids, pos, slots, lens, table))]
        inputs[0] = self._feed(inputs[0], feed)
        self._inputs_queued()
        return self.graph_runner.run(inputs)[:n]

    def _to_device(self, slot: int, array: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor through a pinned staging buffer kept per input slot
        (pinning a fresh buffer costs a cudaHostAlloc, ~40 us, every step). Two sets of buffers
        alternate by launch; a set is written again only after the event that ``_inputs_queued``
        recorded behind its previous launch's copies has completed (``_pinned``)."""
        tensor = torch.from_numpy(array)
        if self.device.type == "cpu":
            return tensor
        host = self._pinned(slot, tensor.numel(), tensor.dtype).view(tensor.shape)
        host.copy_(tensor)
        return host.to(self.device, non_blocking=True)

    def _pinned(self, slot: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        parity = self._num_launches % 2
        event = self._staging_events.pop(parity, None)
        if event is not None:  # the set's previous copies (two launches ago) must have run
            event.synchronize()
        key = (slot, parity)
        buf = self._staging.get(key)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = torch.empty(max(numel, 1 << 12), dtype=dtype).pin_memory()
            self._staging[key] = buf
        return buf[:numel]

    def _inputs_queued(self) -> None:
        """Mark this launch's staging set: its host-to-device copies are queued before here."""
        if self.device.type != "cpu":
            event = torch.Event(device=self.device)
            event.record()
            self._staging_events[self._num_launches % 2] = event

    def _take_readback(self, n: int) -> torch.Tensor:
        """A pinned int64 buffer of at least ``n`` for a step's sampled ids, back in the pool
        once the host has read them (``_resolve``)."""
        for i, buf in enumerate(self._readback_pool):
            if buf.numel() >= n:
                return self._readback_pool.pop(i)
        return torch.empty(max(n, 1024), dtype=torch.int64).pin_memory()

    # -- inputs ----------------------------------------------------------------------------

    @dataclass
    class _Inputs:
        input_ids: torch.Tensor
        positions: torch.Tensor
        attn: AttentionBatch
        logits_indices: torch.Tensor
        samples: list[bool]
        prompt_lp_rows: list[tuple[RunnerRequest, int, int, int]]  # (state, first row, start, n)

    def _prepare_inputs(self, states: list[RunnerRequest], counts: list[int],
                        num_sampled: list[int]) -> "_Inputs":
        bs = self.block_size
        ids, pos, slots, starts, seq_lens, logits_idx, samples, plp = [], [], [], [0], [], [], [], []
        feed: list[tuple[int, int]] = []
        max_blocks = max(len(s.block_ids) for s in states)
        table = np.zeros((len(states), max_blocks), dtype=np.int32)
        for i, (state, n, s) in enumerate(zip(states, counts, num_sampled)):
            c = state.num_computed_tokens
            p = np.arange(c, c + n)
            blocks = np.asarray(state.block_ids, dtype=np.int64)
            table[i, :len(blocks)] = blocks
            if c + n <= len(state.token_ids):
                ids.append(np.asarray(state.token_ids[c:c + n], dtype=np.int64))
            else:  # a decode whose input the last step sampled
                ids.append(np.asarray([self._input_token(state, c, starts[-1], feed)], dtype=np.int64))
            pos.append(p)
            slots.append(blocks[p // bs] * bs + p % bs)
            row0 = starts[-1]
            starts.append(row0 + n)
            seq_lens.append(c + n)
            sampling = s > 0  # the scheduler decides (SchedulerOutput.num_sampled_tokens)
            samples.append(sampling)
            if sampling:
                logits_idx.append(row0 + n - 1)
            if state.params.prompt_logprobs is not None and c < state.num_prompt_tokens - 1:
                plp.append((state, row0, c, min(n, state.num_prompt_tokens - 1 - c)))
            state.num_computed_tokens = c + n
        dev = self.device
        attn = AttentionBatch(
            num_tokens=starts[-1], num_seqs=len(states),
            num_decodes=sum(1 for n in counts if n == 1) if counts[0] == 1 else 0,
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(table).to(dev),
            slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
            max_query_len=max(counts), max_seq_len=max(seq_lens),
            query_start_loc_host=starts, seq_lens_host=seq_lens)
        return self._Inputs(self._feed(torch.from_numpy(np.concatenate(ids)).to(dev), feed),
                            torch.from_numpy(np.concatenate(pos)).to(dev), attn,
                            torch.tensor(logits_idx, dtype=torch.int64, device=dev), samples, plp)

    def _sampling_batch(self, rows: list[RunnerRequest]) -> SamplingBatch:
        dev = self.device
        params = [r.params for r in rows]
        all_greedy = all(p.is_greedy for p in params)
        temperature = None if all_greedy else torch.tensor(
            [0.0 if p.is_greedy else p.temperature for p in params], dtype=torch.float32, device=dev)
        top_k = top_p = min_p = None
        if not all_greedy:
            if any(p.top_k > 0 for p in params):
                top_k = torch.tensor([p.top_k or self.vocab_size for p in params], device=dev)
            if any(p.top_p < 1.0 for p in params):
                top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)
            if any(p.min_p > 0 for p in params):
                min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)
        batch = SamplingBatch(temperature, all_greedy, top_p, top_k, min_p)
        if any(p.needs_penalties for p in params):
            self._add_penalties(batch, rows)
        batch.logit_bias = [(i, list(p.logit_bias), list(p.logit_bias.values()))
                            for i, p in enumerate(params) if p.logit_bias] or None
        batch.banned = self._banned(rows) or None
        # Output position of the token sampled now: the step brought num_computed_tokens to it.
        batch.seeds = [(i, seed_for_position(p.seed, r.num_computed_tokens - r.num_prompt_tokens))
                       for i, (r, p) in enumerate(zip(rows, params))
                       if p.seed is not None and not p.is_greedy] or None
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        batch.max_num_logprobs = max(wanted) if wanted else None
        return batch

    def _add_penalties(self, batch: SamplingBatch, rows: list[RunnerRequest]) -> None:
        dev, vocab = self.device, self.vocab_size
        counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=dev)
        prompt = torch.zeros(len(rows), vocab, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            out = r.token_ids[r.num_prompt_tokens:]
            if out:
                idx = torch.tensor(out, device=dev)
                counts[i].scatter_add_(0, idx, torch.ones(len(out), device=dev))
            prompt[i, torch.tensor(r.token_ids[:r.num_prompt_tokens], device=dev)] = True
        ps = [r.params for r in rows]
        batch.presence = torch.tensor([p.presence_penalty for p in ps], device=dev)
        batch.frequency = torch.tensor([p.frequency_penalty for p in ps], device=dev)
        batch.repetition = torch.tensor([p.repetition_penalty for p in ps], device=dev)
        batch.output_counts, batch.prompt_mask = counts, prompt

    def _banned(self, rows: list[RunnerRequest]) -> list[tuple[int, list[int]]]:
        banned = []
        for i, r in enumerate(rows):
            p = r.params
            if p.min_tokens and r.num_computed_tokens - r.num_prompt_tokens < p.min_tokens:
                ids = set(p.stop_token_ids) | set(self.eos_token_ids)
                if ids:
                    banned.append((i, sorted(ids)))
        return banned

    # -- outputs ---------------------------------------------------------------------------

    def _collect(self, rows: list[RunnerRequest], result: SamplerOutput, tokens: list[int],
                 out: ModelRunnerOutput) -> None:
        lp = None
        if result.sampled_logprob is not None:
            lp = (result.sampled_logprob.tolist(), result.sampled_rank.tolist(),
                  result.topk_ids.tolist() if result.topk_ids is not None else None,
                  result.topk_logprobs.tolist() if result.topk_logprobs is not None else None)
        for i, (state, tok) in enumerate(zip(rows, tokens)):
            state.token_ids.append(tok)
            out.sampled[state.request_id] = [tok]
            k = state.params.logprobs
            if k is not None and lp is not None:
                top = list(zip(lp[2][i][:k], lp[3][i][:k])) if k and lp[2] is not None else []
                out.logprobs[state.request_id] = [(tok, lp[0][i], lp[1][i], top)]
            if state.prompt_logprobs and len(state.prompt_logprobs) == state.num_prompt_tokens - 1:
                out.prompt_logprobs[state.request_id] = [None] + state.prompt_logprobs
                state.prompt_logprobs = []

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: "_Inputs", out: ModelRunnerOutput) -> None:
        for state, row0, start, n in inputs.prompt_lp_rows:
            logits = self.model.compute_logits(hidden[row0:row0 + n]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            targets = torch.tensor(state.token_ids[start + 1:start + 1 + n], device=logits.device)
            chosen = logprobs.gather(-1, targets[:, None])
            ranks = ((logprobs > chosen).sum(-1) + 1).tolist()
            k = state.params.prompt_logprobs
            top_lp, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
            for j in range(n):
                top = list(zip(top_ids[j].tolist(), top_lp[j].tolist())) if k else []
                state.prompt_logprobs.append((targets[j].item(), chosen[j, 0].item(), ranks[j], top))


class StepHandle:
    """A launched step. ``result()`` waits for its sampled ids (an event, not a stream sync: a
    step launched after it keeps running) and puts them into the requests' states, once."""

    def __init__(self, runner: Optional[ModelRunner], rows: list[RunnerRequest],
                 sampled: Optional[SamplerOutput], host_ids: Optional[torch.Tensor], event,
                 out: ModelRunnerOutput):
        self.runner = runner
        self.rows = rows
        self.sampled = sampled  # device tensors; logprobs already on their way to the host
        self.host_ids = host_ids  # pinned; valid once ``event`` completes
        self.event = event
        self.out = out
        self.index = {state.request_id: i for i, state in enumerate(rows)}  # row in sampled ids
        self.readback: Optional[torch.Tensor] = None  # the pooled pinned buffer under host_ids
        self._resolved = runner is None

    @classmethod
    def done(cls, out: ModelRunnerOutput) -> "StepHandle":
        """A step that sampled nothing (a partial prefill, an earlier pipeline stage)."""
        return cls(None, [], None, None, None, out)

    def result(self) -> ModelRunnerOutput:
        if not self._resolved:
            self._resolved = True
            self.runner._resolve(self)
        return self.out


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; in host memory through calloc, so the OS zeroes pages lazily as they are used
    (filling a multi-GiB CPU cache eagerly costs seconds at start-up)."""
    if device.type != "cpu" or 0 in shape:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)

