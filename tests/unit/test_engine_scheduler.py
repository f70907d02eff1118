"""Scheduler: continuous batching, token budget, chunked prefill, preemption, FCFS, abort."""

from __future__ import annotations

from fleetserve_server.engine.block_manager import BlockManager
from fleetserve_server.engine.config import EngineConfig
from fleetserve_server.engine.sampling_params import SamplingParams
from fleetserve_server.engine.scheduler import Scheduler, SchedulerOutput
from fleetserve_server.engine.sequence import Sequence, SequenceStatus
from fleetserve_server.engine.toy import ToyModelRunner


def make(**kw) -> tuple[Scheduler, ToyModelRunner]:
    defaults = dict(max_model_len=64, num_blocks=64, block_size=4, max_batch_tokens=64, max_num_seqs=8)
    defaults.update(kw)
    config = EngineConfig(**defaults)
    bm = BlockManager(config.num_blocks, config.block_size)
    return Scheduler(config, bm), ToyModelRunner(config.num_blocks, config.block_size)


def add(s: Scheduler, n_tokens: int, first: int = 0) -> Sequence:
    seq = Sequence(f"r{first}", [(first + i) % 200 for i in range(n_tokens)], SamplingParams(max_tokens=64),
                   arrival_time=0.0)
    s.add(seq)
    return seq


def step(s: Scheduler, runner: ToyModelRunner) -> SchedulerOutput:
    """Schedule, run on the toy runner (which checks block tables and positions), update."""
    out = s.schedule()
    sampled = runner.execute(out.batch) if not out.is_empty else {}
    s.update(out, sampled)
    s.block_manager.check_invariants(s.running)
    return out


def plan(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    return [(x.seq_id, x.start_pos, len(x.token_ids), x.sample) for x in out.batch.sequences]


def test_prefill_then_decode_batched_together():
    s, runner = make()
    a, b = add(s, 5, 0), add(s, 7, 100)
    out = step(s, runner)
    assert plan(out) == [(a.seq_id, 0, 5, True), (b.seq_id, 0, 7, True)]
    assert len(a) == 6 and len(b) == 8  # each got a token
    out = step(s, runner)
    assert plan(out) == [(a.seq_id, 5, 1, True), (b.seq_id, 7, 1, True)]


def test_new_requests_join_running_batch_each_step():
    s, runner = make()
    a = add(s, 5, 0)
    step(s, runner)
    b = add(s, 6, 50)
    out = step(s, runner)
    assert plan(out) == [(a.seq_id, 5, 1, True), (b.seq_id, 0, 6, True)]  # decode first, then the newcomer


def test_chunked_prefill_within_token_budget_and_decodes_first():
    s, runner = make(max_batch_tokens=8, max_model_len=64)
    a = add(s, 3, 0)
    step(s, runner)  # a: prefill done, now decoding
    long = add(s, 20, 100)
    outs = [step(s, runner) for _ in range(3)]
    assert plan(outs[0]) == [(a.seq_id, 3, 1, True), (long.seq_id, 0, 7, False)]
    assert plan(outs[1]) == [(a.seq_id, 4, 1, True), (long.seq_id, 7, 7, False)]
    assert plan(outs[2]) == [(a.seq_id, 5, 1, True), (long.seq_id, 14, 6, True)]  # last chunk samples
    assert all(o.batch.num_tokens <= 8 for o in outs)
    assert len(long) == 21


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    s, runner = make(max_batch_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    a, b = add(s, 10, 0), add(s, 10, 50)
    out = step(s, runner)
    assert plan(out) == [(a.seq_id, 0, 10, True)]
    out = step(s, runner)
    assert plan(out) == [(a.seq_id, 10, 1, True), (b.seq_id, 0, 10, True)]


def test_max_num_seqs_limits_running():
    s, runner = make(max_num_seqs=2)
    seqs = [add(s, 4, 10 * i) for i in range(4)]
    out = step(s, runner)
    assert [x.seq_id for x in out.batch.sequences] == [seqs[0].seq_id, seqs[1].seq_id]
    assert len(s.running) == 2 and len(s.waiting) == 2
    s.finish(seqs[0], "stop")
    out = step(s, runner)
    assert [x.seq_id for x in out.batch.sequences] == [seqs[1].seq_id, seqs[2].seq_id]


def test_fcfs_head_of_queue_is_not_overtaken():
    s, runner = make(num_blocks=8, max_model_len=32)
    big_running = add(s, 20, 0)  # 5 blocks
    step(s, runner)
    head = add(s, 16, 100)  # needs 4 blocks, only 3 free
    small = add(s, 3, 150)  # would fit, but arrived later
    out = step(s, runner)
    assert [x.seq_id for x in out.batch.sequences] == [big_running.seq_id]
    assert list(s.waiting) == [head, small]


def test_preempts_newest_when_blocks_run_out_and_recomputes_later():
    s, runner = make(num_blocks=6, max_model_len=24, max_num_seqs=4)
    old, new = add(s, 8, 0), add(s, 8, 100)  # 2 blocks each; 2 left
    step(s, runner)  # both prefilled: 9 tokens each, the 9th's block comes with its decode
    assert s.block_manager.num_free_blocks == 2
    step(s, runner)
    assert s.block_manager.num_free_blocks == 0
    for _ in range(3):
        step(s, runner)  # decodes fill positions 9..11 of the third blocks
    assert len(old) == 13 and len(new) == 13
    out = step(s, runner)  # both need a 4th block for position 12: the newer one is preempted
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.block_table == [] and new.num_computed_tokens == 0
    assert s.num_preemptions == 1 and new.num_preemptions == 1
    assert plan(out) == [(old.seq_id, 12, 1, True)]
    assert list(s.waiting) == [new]
    s.finish(old, "length")  # frees its blocks (its full ones stay cached)
    out = step(s, runner)
    # recompute: the whole sequence (prompt + generated) in one prefill, sampling its next token;
    # its two full blocks were still cached, so only the rest is computed
    assert [x.seq_id for x in out.batch.sequences] == [new.seq_id]
    assert out.batch.sequences[0].start_pos == 8 and out.batch.sequences[0].sample
    assert len(new) == 14


def test_newest_sequence_preempts_itself_and_resumes_later():
    s, runner = make(num_blocks=4, max_model_len=16, max_num_seqs=4)
    a = add(s, 7, 0)  # 2 blocks
    b = add(s, 8, 100)  # 2 blocks: now everything is used
    step(s, runner)
    out = step(s, runner)  # a's token 8 fits its block; b's needs a new one and b is the newest
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 7, 1, True)]
    assert s.running == [a] and list(s.waiting) == [b]
    s.finish(a, "stop")
    out = step(s, runner)
    assert [x.seq_id for x in out.batch.sequences] == [b.seq_id]
    assert out.batch.sequences[0].start_pos == 8  # its two full blocks came back from the cache
    assert len(b) == 10


def test_abort_frees_blocks_at_once():
    s, runner = make()
    a = add(s, 9, 0)
    step(s, runner)
    assert s.block_manager.num_used_blocks == 3
    s.finish(a, "abort")
    assert s.block_manager.num_used_blocks == 0
    assert a.status is SequenceStatus.FINISHED and a.finish_reason == "abort"
    assert not s.has_unfinished()
    w = add(s, 4, 10)
    s.finish(w, "abort")  # a waiting one leaves the queue
    assert not s.waiting
