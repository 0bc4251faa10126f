"""A seeded random driver of the real Scheduler + BlockManager (no model) and its invariants.

Each scenario draws a configuration (block size, a small KV cache that forces preemption, prefix
caching and chunked prefill on or off, token budget, max_num_seqs, context length), then runs a
random mix of: new requests (shared prefixes, block-size multiples, prompts at the context
length), steps whose "model" returns random tokens (with speculative drafts accepted in runs of
several tokens), aborts at any point (mid-prefill, preempted, waiting) and stop tokens. After
every step ``check_invariants`` runs; at the end everything must be freed.
"""

from __future__ import annotations

import random
from collections import Counter

from tessellm.core.block_manager import BlockManager, hash_block
from tessellm.core.request import Request
from tessellm.core.request_queue import priority_key
from tessellm.core.sampling_params import SamplingParams
from tessellm.core.scheduler import Scheduler, SchedulerConfig
from tessellm.core.spec_ahead import computed_and_drafts
from tessellm.core.state_prefix import StateSnapshots
from tessellm.core.step import ModelRunnerOutput
from tests.core.test_state_prefix import check_pool

STOP = 3  # a stop token id the fake model emits now and then
EOS = 0


def check_invariants(s: Scheduler, budget: int, out=None) -> None:
    kv = s.kv
    refs = Counter(b.block_id for blocks in kv.req_blocks.values() for b in blocks)
    for block in kv.blocks:
        assert block.ref_cnt == refs.get(block.block_id, 0), (block, refs.get(block.block_id))
        assert (block.block_id in kv.free_queue) == (block.ref_cnt == 0), block
    assert len(kv.free_queue) + sum(1 for b in kv.blocks if b.ref_cnt > 0) == kv.num_blocks
    for blocks in kv.req_blocks.values():
        assert len({b.block_id for b in blocks}) == len(blocks), "a table holds a block twice"
    for h, block in kv.cached.items():
        assert block.block_hash == h, (h, block)
    # Requests: one place each; held blocks cover the computed tokens; queues hold live ones.
    ids_running = [r.request_id for r in s.running]
    ids_waiting = [r.request_id for r in s.waiting]
    assert not set(ids_running) & set(ids_waiting)
    assert len(set(ids_running)) == len(ids_running) and len(set(ids_waiting)) == len(ids_waiting)
    assert set(ids_running) | set(ids_waiting) == set(s.requests)
    assert s.deferred <= set(ids_waiting), "a request counted deferred is not waiting"
    assert len(s.running) <= s.config.max_num_seqs
    if s.config.policy == "priority":  # served, and preempted from the back, in priority order
        keys = [priority_key(r) for r in s.running]
        assert keys == sorted(keys), keys
    for rid in kv.req_blocks:
        assert rid in s.requests, f"blocks leaked by finished request {rid}"
    for req in s.requests.values():
        assert 0 <= req.num_computed_tokens <= req.num_tokens
        assert req.num_tokens <= s.config.max_model_len
        held = kv.block_ids(req.request_id)
        ahead = s.in_flight.tokens_ahead(req.request_id)
        # What its steps in flight write fits the context and its blocks; a block table holds
        # max_model_len tokens at most.
        assert req.num_computed_tokens + ahead <= s.config.max_model_len, (req.request_id, ahead)
        assert len(held) >= kv.blocks_needed(req.num_computed_tokens + ahead), req.request_id
        assert len(held) <= kv.blocks_needed(s.config.max_model_len), (req.request_id, len(held))
        if req in s.waiting:
            assert req.num_computed_tokens == 0 and not held
        # Published blocks hold exactly the tokens their hash says.
        parent = None
        blocks = kv.req_blocks.get(req.request_id, [])
        for i in range(min(req.num_computed_tokens // kv.block_size, len(blocks))):
            toks = tuple(req.all_token_ids[i * kv.block_size:(i + 1) * kv.block_size])
            h = hash_block(parent, toks, req.cache_key)
            if blocks[i].block_hash is not None:
                assert blocks[i].block_hash == h, (req.request_id, i)
            parent = h
    if kv.states is not None:
        check_pool(kv)
    if out is not None and kv.states is not None:
        # saves inside a chunk (state_saves_within), also written after the step's restores
        within = {slot for pairs in out.state_saves_within.values() for _, slot in pairs}
        for rid, slot in out.state_restores.items():  # a hit starts from its last block's state
            # (or already taken over by a save later in the step, which the device runs after)
            assert (any(b.state_slot == slot for b in kv.req_blocks[rid])
                    or slot in out.state_saves.values() or slot in within), (rid, slot)
        for rid, slot in out.state_saves.items():  # the block its chunk ends in waits for it
            start = s.requests[rid].num_computed_tokens + s.in_flight.tokens_ahead(rid)
            assert start % kv.block_size == 0, (rid, start)
            assert kv.req_blocks[rid][start // kv.block_size - 1].state_slot == slot
        for rid, pairs in out.state_saves_within.items():  # each on a block boundary, its block's
            for n, slot in pairs:
                assert n % kv.block_size == 0, (rid, n)
                assert kv.req_blocks[rid][n // kv.block_size - 1].state_slot == slot, (rid, n)
    if out is not None:
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values()) <= budget
        for rid, n in out.num_scheduled_tokens.items():
            assert n > 0


class FakeModel:
    """Random tokens; accepts a random prefix of each request's drafts; proposes new drafts."""

    def __init__(self, rng: random.Random, vocab: int, spec: int):
        self.rng, self.vocab, self.spec = rng, vocab, spec

    def token(self) -> int:
        r = self.rng.random()
        return STOP if r < 0.02 else EOS if r < 0.03 else self.rng.randrange(4, self.vocab)

    def run(self, s: Scheduler, out) -> ModelRunnerOutput:
        sampled, spec, ahead = {}, {}, {}
        for rid, num in out.num_sampled_tokens.items():
            drafts = out.spec_token_ids.get(rid, [])
            if rid in out.spec_ahead:  # the runner verifies j <= reserved drafts of its own
                ahead[rid] = self.rng.randint(0, out.spec_ahead[rid])
                drafts = [self.token() for _ in range(ahead[rid])]
            accepted = 0
            while accepted < len(drafts) and self.rng.random() < 0.6:
                accepted += 1
            sampled[rid] = list(drafts[:accepted]) + [self.token()]
            if self.spec and self.rng.random() < 0.7:
                spec[rid] = [self.token() for _ in range(self.rng.randint(1, self.spec))]
        return ModelRunnerOutput(sampled, spec_token_ids=spec, spec_ahead_drafts=ahead)


def rng_bool(model: FakeModel) -> bool:
    return model.rng.random() < 0.3


def random_config(rng: random.Random):
    bs = rng.choice([1, 2, 4, 8, 16])
    max_len = rng.choice([16, 32, 64, 100])
    num_blocks = rng.randint(max(2, -(-max_len // bs)), 4 * -(-max_len // bs) + 4)
    chunked = rng.random() < 0.6
    mode = rng.choice(["sync", "sync", "async", "pp"])
    budget = rng.randint(1, 64) if chunked else rng.randint(max_len, 2 * max_len)
    cfg = SchedulerConfig(max_num_seqs=rng.randint(1, 8), max_num_batched_tokens=budget,
                          max_model_len=max_len, enable_chunked_prefill=chunked,
                          num_speculative_tokens=rng.choice([0, 0, 2, 4]),
                          async_scheduling=mode == "async",
                          pipeline_parallel_size=rng.randint(2, 3) if mode == "pp" else 1,
                          num_lookahead_tokens=rng.choice([0, 0, 0, 2, 3]))
    kv = BlockManager(num_blocks, bs, enable_prefix_caching=rng.random() < 0.7)
    own = random.Random(rng.random())  # its own stream: the draws above stay
    snapshots = own.randint(0, 6)
    if kv.enable_prefix_caching and snapshots:  # a recurrent-state model (core/state_prefix.py)
        kv.states = StateSnapshots(snapshots)
    cfg.policy = own.choice(["fcfs", "fcfs", "priority"])  # core/request_queue.py
    return Scheduler(cfg, kv)


def random_prompt(rng: random.Random, s: Scheduler, prefixes: list[list[int]]) -> list[int]:
    cap = min(s.config.max_model_len - 1, s.kv.num_blocks * s.kv.block_size - 1)
    kind = rng.random()
    if kind < 0.15:
        n = cap  # at the context length / cache size
    elif kind < 0.35:
        n = max(1, min(cap, s.kv.block_size * rng.randint(1, 4)))  # block multiples
    else:
        n = rng.randint(1, cap)
    if prefixes and rng.random() < 0.5:
        base = rng.choice(prefixes)[:n]
        return base + [rng.randrange(4, 50) for _ in range(n - len(base))]
    prompt = [rng.randrange(4, 50) for _ in range(n)]
    prefixes.append(prompt)
    return prompt


def run_scenario(seed: int, num_events: int = 120) -> dict:
    rng = random.Random(seed)
    s = random_config(rng)
    model = FakeModel(rng, 60, s.config.num_speculative_tokens)
    budget = s.config.max_num_batched_tokens
    prefixes: list[list[int]] = []
    waited: dict[str, int] = {}
    counter = 0
    stats = Counter()
    queue: list = []  # steps in flight, oldest first
    runner = RunnerTables()
    for _ in range(num_events):
        r = rng.random()
        if r < 0.3 and len(s.requests) < 12:
            counter += 1
            n = rng.choice([1, 1, 1, 2, 3])
            params = SamplingParams(max_tokens=rng.randint(1, 20), n=1,
                                    stop_token_ids=[STOP] if rng.random() < 0.5 else [],
                                    ignore_eos=rng.random() < 0.3)
            prompt = random_prompt(rng, s, prefixes)
            salt = "s" if rng.random() < 0.1 else None  # a salted prefix never shares
            for k in range(n):  # n>1 forks: siblings with the same prompt
                rid = f"r{counter}-{k}"
                s.add_request(Request(rid, list(prompt), params, eos_token_ids=[EOS], cache_salt=salt,
                                      wait_for=f"r{counter}-0" if k else None,
                                      priority=counter % 3 if s.config.policy == "priority" else 0))
            stats["added"] += n
        elif r < 0.38 and s.requests:
            rid = rng.choice(sorted(s.requests))
            s.abort_requests([rid])
            stats["aborted"] += 1
        else:
            step(s, model, budget, waited, stats, queue, runner)
    for _ in range(5000):
        if not s.has_unfinished():
            break
        step(s, model, budget, waited, stats, queue, runner)
    assert not s.has_unfinished(), "requests never finished"
    s.take_finished_outputs()
    kv = s.kv
    assert kv.num_free_blocks == kv.num_blocks and not kv.req_blocks, "blocks leaked"
    assert all(b.ref_cnt == 0 for b in kv.blocks)
    stats["preemptions"] = s.num_preemptions_total
    return stats


class RunnerTables:
    """The model runner's view of block tables, built only from what the steps send
    (``InputBatch.apply``'s bookkeeping): it must equal the scheduler's after every step."""

    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        # Recurrent-state snapshots: slot -> (the request, how many of its tokens) whose state
        # it holds, written in device order (a step's restores read before its saves write).
        self.pool: dict[int, tuple] = {}

    def apply(self, s: Scheduler, out) -> None:
        for new in out.new_requests:
            slot = out.state_restores.get(new.request_id)
            if slot is not None:  # the snapshot holds the state of exactly the hit's tokens
                saver, end = self.pool[slot]
                assert saver is not None, "a snapshot past a rejected draft restored"
                assert end == new.num_computed_tokens
                assert saver.all_token_ids[:end] == new.all_token_ids[:end]
            elif s.kv.states is not None:
                assert new.num_computed_tokens == 0, "a hit without a state to start from"
        for rid, slot in out.state_saves.items():
            req = s.requests[rid]
            end = req.num_computed_tokens + s.in_flight.tokens_ahead(rid)
            self.pool[slot] = (req, end)  # a decode step ahead: its last token known later
        for rid, pairs in out.state_saves_within.items():  # block boundaries inside the chunk
            req = s.requests[rid]
            end = req.num_computed_tokens + s.in_flight.tokens_ahead(rid)  # after this step
            for n, slot in pairs:
                assert end - out.num_scheduled_tokens[rid] < n < end, (rid, n, end)
                self.pool[slot] = (req, n)
        for rid in out.dropped_request_ids:
            self.tables.pop(rid, None)
        for rid, num_blocks in out.kept_blocks.items():
            if rid in self.tables:
                del self.tables[rid][num_blocks:]
        for new in out.new_requests:
            assert new.request_id not in self.tables, f"{new.request_id} sent as new twice"
            self.tables[new.request_id] = list(new.block_ids)
        for cached in out.cached_requests:
            self.tables[cached.request_id].extend(cached.new_block_ids)
        for rid in out.num_scheduled_tokens:
            assert self.tables[rid] == s.kv.block_ids(rid), (rid, self.tables[rid], s.kv.block_ids(rid))


    def run(self, s: Scheduler, out, result: ModelRunnerOutput) -> None:
        """The step's saves of speculating requests (``state_saves_if_accepted``), as the
        runner makes them once the step runs, just before ``update``: the state after ``n``
        tokens where the step computed token ``n - 1``, a rejected draft's state (None) past
        its accepted ones. A slot its block gave back since is left alone: on the device this
        write came before whatever was written there later."""
        bs = s.kv.block_size
        for rid, pairs in out.state_saves_if_accepted.items():
            req = s.requests.get(rid)
            dropped = any(st.sched is out and rid in st.dropped for st in s.in_flight.steps)
            if req is None or req.is_finished or dropped:
                continue
            start = req.num_computed_tokens  # the steps before this one are back
            computed, drafts = computed_and_drafts(out, result, rid, out.num_scheduled_tokens[rid])
            kept = computed - (drafts - (len(result.sampled.get(rid, [])) - 1) if drafts else 0)
            blocks = s.kv.req_blocks.get(rid, [])
            for n, slot in pairs:
                i = n // bs - 1
                if i < len(blocks) and blocks[i].state_slot == slot and start < n <= start + computed:
                    self.pool[slot] = (req, n) if n <= start + kept else (None, n)


def depth(s: Scheduler) -> int:
    """Steps in flight at most: one per pipeline stage, two under async scheduling."""
    return 2 if s.config.async_scheduling else s.config.pipeline_parallel_size


def step(s: Scheduler, model: FakeModel, budget: int, waited: dict, stats: Counter,
         queue: list, runner: RunnerTables) -> None:
    out = s.schedule()
    check_invariants(s, budget, out)
    if not out.is_empty:
        runner.apply(s, out)
        queue.append(out)
    for rid in list(s.requests):
        if rid in out.num_scheduled_tokens:
            waited.pop(rid, None)
        else:
            waited[rid] = waited.get(rid, 0) + 1
            assert waited[rid] < 2000, f"{rid} starved"
    for rid in list(waited):
        if rid not in s.requests:
            del waited[rid]
    while queue and (len(queue) >= depth(s) or out.is_empty or rng_bool(model)):
        done = queue.pop(0)
        result = model.run(s, done)
        runner.run(s, done, result)
        s.update(done, result)
        check_invariants(s, budget)
    s.take_finished_outputs()
    stats["steps"] += 1
    stats["spec"] += len(out.spec_token_ids)
    stats["spec_ahead"] += len(out.spec_ahead)
    stats["kept"] += len(out.kept_blocks)
    stats["in_flight_max"] = max(stats["in_flight_max"], len(queue))
    check_invariants(s, budget)
