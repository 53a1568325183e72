"""The generate model's in-flight batching scheduler (llm_scheduler.py) over the generic-graph KV engine
(kv_padded.py), run in-process on the exported r1-distill-tiny with a real ONNX Runtime session: every answer
is compared with the same prompt decoded alone by the independent reference loop (exporter/repository/reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from exporter.repository.reference import GreedyLoop

sys.path.insert(0, str(REPO / "exporter/repository/python_models"))
import engine_runtimes  # noqa: E402, F401
import kv_padded  # noqa: E402
import llm_scheduler as ls  # noqa: E402

WORDS = ("the key value cache stores attention keys and values of every past token while the model thinks step by "
         "step about prefill and decode on a GPU").split()


@pytest.fixture(scope="module")
def onnx_path(exported) -> Path:
    return exported("r1-distill-tiny").onnx_path


@pytest.fixture(scope="module")
def session(onnx_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(onnx_path):
    return GreedyLoop(onnx_path)


def make_engine(session, max_rows: int, max_batch: int | None = None) -> kv_padded.PaddedKVEngine:
    slots = []
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            slots.append(kv_padded.CacheSlot(i.name, i.name.replace("past_key_values.", "present."), i.shape[1], i.shape[3]))
    return kv_padded.PaddedKVEngine(lambda feeds, outs: session.run(outs, feeds), slots, "float32", max_rows,
                                    max_batch=max_batch)


def make_scheduler(session, rows=8, budget=100_000, queue=64, max_batch=None, eos=frozenset()):
    limits = ls.Limits(max_rows=rows, kv_budget_tokens=budget, max_queue=queue, max_sequence_len=4096)
    return ls.Scheduler(make_engine(session, rows, max_batch), limits, set(eos))


def seq(prompt_ids, max_tokens, stop=(), **kw):
    params = ls.SamplingParams(max_tokens=max_tokens, stop=list(stop), **kw)
    decode = lambda ids: " ".join(str(i) for i in ids)  # noqa: E731 — a stand-in tokenizer: ids as text
    return ls.Sequence(list(prompt_ids), params, ls.TextStream(decode, params.stop))


def prompt(n: int, shift: int = 0) -> list[int]:
    return [(7 * k + 3 * shift + 11) % 700 + 5 for k in range(n)]


def run_all(scheduler, arrivals: dict[int, list], max_steps=2000):
    """Step until every sequence has finished; `arrivals[k]` are submitted before step k."""
    finished = []
    for k in range(max_steps):
        for s in arrivals.get(k, []):
            scheduler.submit(s)
        _, done, _ = scheduler.step()
        finished += done
        if not scheduler.running and not scheduler.waiting and k >= max(arrivals):
            return finished
    raise AssertionError("did not finish")


def test_batched_greedy_equals_each_alone(session, reference):
    """16 requests, mixed prompt lengths and max_tokens, joining while others run, through a batch of 6 rows
    (so some wait for a free row) and engine calls of at most 4 rows: token for token what each gets alone."""
    sched = make_scheduler(session, rows=6, max_batch=4)
    seqs = [seq(prompt(3 + (5 * i) % 29, i), 4 + (7 * i) % 21) for i in range(16)]
    arrivals = {0: seqs[:5], 3: seqs[5:9], 4: seqs[9:10], 11: seqs[10:15], 30: seqs[15:]}
    done = run_all(sched, arrivals)
    assert len(done) == 16 and {s.finish_reason for s in done} == {"length"}
    for s in seqs:
        assert s.tokens == reference(s.prompt_ids, s.params.max_tokens), (len(s.prompt_ids), s.params.max_tokens)
    assert sched.free_rows and len(sched.free_rows) == 6 and sched.reserved == 0
    assert sched.engine.width == 0 and sched.engine.order == []


def test_seeded_sampling_is_the_same_alone_and_in_company(session):
    def sampled(company: int) -> list[int]:
        sched = make_scheduler(session, rows=8)
        target = seq(prompt(12, 1), 20, temperature=0.9, top_p=0.95, seed=1234)
        others = [seq(prompt(5 + i, 9 + i), 15, temperature=1.3, seed=i) for i in range(company)]
        run_all(sched, {0: others[: company // 2] + [target], 2: others[company // 2 :]})
        return target.tokens

    alone = sampled(0)
    assert len(alone) == 20
    assert sampled(5) == alone
    other_seed = make_scheduler(session)
    s = seq(prompt(12, 1), 20, temperature=0.9, top_p=0.95, seed=99)
    run_all(other_seed, {0: [s]})
    assert s.tokens != alone  # the seed, not the batch, decides


def test_cancelled_request_frees_its_row_at_the_next_step(session):
    sched = make_scheduler(session, rows=2)
    a, b, c = seq(prompt(8), 200), seq(prompt(9, 1), 200), seq(prompt(10, 2), 5)
    for s in (a, b, c):
        sched.submit(s)
    sched.step()
    assert {a.row, b.row} == {0, 1} and c.status == ls.WAITING
    a.cancelled = True
    _, done, _ = sched.step()
    assert done == [a] and a.finish_reason == "cancelled" and a.row is None
    assert c.status == ls.RUNNING  # took the freed row in the same step
    c.cancelled = False
    waiting = seq(prompt(4), 3)
    sched.submit(waiting)
    waiting.cancelled = True
    _, done, _ = sched.step()
    assert waiting in done and waiting.finish_reason == "cancelled"


def test_stop_string_ends_only_its_own_row(session, reference):
    p = prompt(10, 4)
    full = reference(p, 20)
    stop = f"{full[5]} {full[6]}"  # the stand-in tokenizer decodes ids as space-separated numbers
    sched = make_scheduler(session, rows=4)
    stopped, other = seq(p, 20, stop=[stop]), seq(p, 20)
    run_all(sched, {0: [stopped, other]})
    assert stopped.finish_reason == "stop" and stopped.tokens == full[:7]
    assert stopped.text.text == " ".join(map(str, full[:5])) + " "
    assert other.finish_reason == "length" and other.tokens == full


def test_eos_ends_a_row_unless_ignore_eos(session, reference):
    p = prompt(10, 6)
    full = reference(p, 12)
    eos = {full[3]}
    sched = make_scheduler(session, rows=4, eos=eos)
    ended, ignoring = seq(p, 12), seq(p, 12, ignore_eos=True)
    run_all(sched, {0: [ended, ignoring]})
    assert ended.finish_reason == "eos" and ended.tokens == full[: full.index(full[3])]
    assert ignoring.finish_reason == "length" and ignoring.tokens == full


def test_queue_limit_and_kv_budget(session):
    sched = make_scheduler(session, rows=4, budget=60, queue=2)
    with pytest.raises(ls.RequestError, match="KV-cache budget of 60"):
        sched.submit(seq(prompt(30), 31))
    first, second, third = seq(prompt(20), 20), seq(prompt(20, 1), 20), seq(prompt(5), 5)
    sched.submit(first)
    sched.submit(second)
    with pytest.raises(ls.ServerBusy, match="server busy"):
        sched.submit(seq(prompt(3), 3))
    sched.step()
    # 40 + 40 > 60: the second waits for the budget although a row is free, and FIFO keeps the third behind it
    assert first.status == ls.RUNNING and second.status == ls.WAITING
    sched.submit(third)
    while first.status != ls.FINISHED:
        sched.step()
    assert third.status == ls.WAITING or second.status == ls.RUNNING
    sched.step()
    assert second.status in (ls.RUNNING, ls.FINISHED) and third.status in (ls.RUNNING, ls.FINISHED)


def test_engine_failure_frees_every_row(session):
    sched = make_scheduler(session, rows=3)
    for i in range(3):
        sched.submit(seq(prompt(6, i), 50))
    sched.step()
    done = sched.abort_running()
    assert {s.finish_reason for s in done} == {"error"} and len(done) == 3
    assert sorted(sched.free_rows) == [0, 1, 2] and sched.reserved == 0 and not sched.running


def test_padded_prefill_zeroes_padding_and_matches_alone(session, reference):
    """Prefill of prompts of different lengths in one call: logits equal each prompt alone; the padding the
    left-aligned layout adds is zero in every cache slot."""
    engine = make_engine(session, 4)
    prompts = [prompt(3), prompt(17, 1), prompt(9, 2)]
    logits = engine.prefill([0, 1, 2], prompts)
    for row, p in enumerate(prompts):
        assert int(np.argmax(logits[row])) == reference(p, 1)[0]
        pad = engine.width - len(p)
        assert all(np.all(c[row, :, :pad] == 0) for c in engine.cache)
    engine.release([1])
    assert engine.width == 9 and engine.order == [0, 2]


def test_engine_runners_fail_at_load_with_one_line_naming_what_is_missing(tmp_path, onnx_path):
    """The GPU runners cannot run here (no GPU, no full TensorRT): loading one fails with one line that names
    what is missing — the package, or the GPU — instead of a traceback at the first request. The ONNX Runtime
    runner loads and runs."""
    import engine_runtimes as er

    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(er.MissingRuntime, match=r"^the tensorrt Python runtime is not installed .*pip install tensorrt"):
            er.load_runner("tensorrt", plan, {})
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (r1deploy[rtx]) is the runtime checked here")
    with pytest.raises(er.MissingRuntime) as info:
        er.load_runner("tensorrt_rtx", plan, {})
    message = str(info.value)
    assert "\n" not in message and ("no CUDA device" in message or "cuda-python" in message), message
    with pytest.raises(er.MissingRuntime, match="CUDAExecutionProvider"):
        er.load_runner("onnxruntime", onnx_path, {"parameters": {"ort_providers": {"string_value": '["CUDAExecutionProvider"]'}}})
    run, max_batch = er.load_runner("onnxruntime", onnx_path, {})
    assert max_batch is None
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    import onnxruntime as ort

    for i in ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    (logits,) = run(feeds, ["logits"])
    assert logits.shape[:2] == (1, 3)


# ---- logits processing, log-probabilities, n choices -----------------------------------------------------------
class Stepper:
    """An independent greedy loop over the same ONNX session that lets the test choose each next token from the
    raw logits with its own (plain Python, per-token) processing: the reference for the scheduler's batched one."""

    def __init__(self, session):
        self.session = session
        self.past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
        self.outputs = [o.name for o in session.get_outputs()]

    def run(self, prompt_ids, max_tokens, choose, eos=frozenset()):
        """`choose(raw_logits, tokens_so_far) -> token`; returns (tokens, raw logits of each step)."""
        n = len(prompt_ids)
        feeds = {"input_ids": np.asarray([prompt_ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
                 "position_ids": np.arange(n, dtype=np.int64)[None, :]}
        for i in self.past:
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        tokens, raws = [], []
        while len(tokens) < max_tokens:
            out = dict(zip(self.outputs, self.session.run(self.outputs, feeds), strict=True))
            raw = out["logits"][0, -1].astype(np.float64)
            token = choose(raw, tokens)
            if token in eos:
                break
            tokens.append(token)
            raws.append(raw)
            total = n + len(tokens)
            feeds = {"input_ids": np.asarray([[token]], np.int64), "attention_mask": np.ones((1, total), np.int64),
                     "position_ids": np.asarray([[total - 1]], np.int64)}
            for i in self.past:
                feeds[i.name] = out[i.name.replace("past_key_values.", "present.")]
        return tokens, raws


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_greedy_logprobs_are_the_log_softmax_of_the_engine_logits(session):
    """Greedy with logprobs and top_logprobs, batched with other requests: each token's logprob is the
    log-softmax of the logits an independent in-process loop computes on the same ONNX (within 1e-4), and the top
    list is that distribution's best tokens in order, the chosen one first."""
    p = prompt(14, 3)
    tokens, raws = Stepper(session).run(p, 12, lambda raw, _: int(np.argmax(raw)))
    sched = make_scheduler(session, rows=4)
    target = seq(p, 12, logprobs=True, top_logprobs=5)
    run_all(sched, {0: [seq(prompt(7, 1), 9), target], 1: [seq(prompt(20, 2), 5, logprobs=True)]})
    assert target.tokens == tokens
    assert len(target.pending_logprobs) == 12 and len(target.pending_top) == 12
    for raw, token, lp, (ids, values) in zip(raws, tokens, target.pending_logprobs, target.pending_top, strict=True):
        want = _log_softmax(raw)
        assert abs(lp - want[token]) < 1e-4
        assert ids[0] == token and len(ids) == 5
        assert ids == [int(i) for i in np.argsort(-want, kind="stable")[:5]]
        assert np.allclose(values, want[ids], atol=1e-4)
    assert abs(target.cumulative_logprob - sum(target.pending_logprobs)) < 1e-9


def test_sampled_logprobs_follow_the_temperature(session):
    """At temperature T the logprob of each drawn token is log-softmax(logits / T) of that step."""
    p = prompt(10, 8)
    sched = make_scheduler(session, rows=2)
    s = seq(p, 8, temperature=0.7, seed=5, logprobs=True)
    run_all(sched, {0: [s]})
    drawn = iter(s.tokens)
    _, raws = Stepper(session).run(p, 8, lambda raw, _: next(drawn))
    for raw, token, lp in zip(raws, s.tokens, s.pending_logprobs, strict=True):
        assert abs(lp - _log_softmax(raw / 0.7)[token]) < 1e-4


def _processed_reference(prompt_ids, tokens, raw, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """vLLM's penalties written out token by token (the scheduler applies them as array operations)."""
    x = np.array(raw, np.float64)
    seen = set(prompt_ids) | set(tokens)
    for t in seen:
        if repetition != 1:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(tokens):
        x[t] -= frequency * tokens.count(t) + presence
    for t, b in (bias or {}).items():
        x[t] += b
    return x


@pytest.mark.parametrize("kw", [
    {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"repetition_penalty": 2.0},
    {"frequency_penalty": 1.0, "presence_penalty": 1.5, "repetition_penalty": 1.5},
])
def test_penalties_change_greedy_output_as_vllm_defines_them(session, kw):
    """Each penalty, batched with an unpenalized row of the same prompt: the penalized row is token for token
    the reference's processing, the plain row is plain greedy, and the two differ (the effect is visible)."""
    p = prompt(12, 5)
    args = {"presence": kw.get("presence_penalty", 0.0), "frequency": kw.get("frequency_penalty", 0.0),
            "repetition": kw.get("repetition_penalty", 1.0)}
    want, _ = Stepper(session).run(p, 40, lambda raw, toks: int(np.argmax(_processed_reference(p, toks, raw, **args))))
    plain_want, _ = Stepper(session).run(p, 40, lambda raw, _: int(np.argmax(raw)))
    sched = make_scheduler(session, rows=4)
    penalized, plain = seq(p, 40, **kw), seq(p, 40)
    run_all(sched, {0: [plain, penalized]})
    assert penalized.tokens == want and plain.tokens == plain_want
    assert penalized.tokens != plain.tokens
    assert len(set(penalized.tokens)) >= len(set(plain.tokens))  # penalties spread the output over more tokens


def test_logit_bias_forces_and_forbids_tokens(session):
    p = prompt(9, 2)
    plain_want, _ = Stepper(session).run(p, 6, lambda raw, _: int(np.argmax(raw)))
    sched = make_scheduler(session, rows=4)
    forced = seq(p, 6, logit_bias={42: 100.0})
    forbidden = seq(p, 6, logit_bias={t: -100.0 for t in set(plain_want)})
    plain = seq(p, 6)
    run_all(sched, {0: [forced, forbidden, plain]})
    assert forced.tokens == [42] * 6
    assert plain.tokens == plain_want and not set(forbidden.tokens) & set(plain_want)
    bias = {t: -100.0 for t in set(plain_want)}
    want, _ = Stepper(session).run(p, 6, lambda raw, toks: int(np.argmax(_processed_reference(p, toks, raw, bias=bias))))
    assert forbidden.tokens == want


def test_min_tokens_masks_eos_until_reached(session):
    p = prompt(10, 6)
    full, _ = Stepper(session).run(p, 12, lambda raw, _: int(np.argmax(raw)))
    eos = {full[2]}
    sched = make_scheduler(session, rows=4, eos=eos)
    early, held = seq(p, 12), seq(p, 12, min_tokens=8)
    run_all(sched, {0: [early, held]})
    assert early.finish_reason == "eos" and len(early.tokens) == 2

    def masked(raw, toks):
        x = raw.copy()
        if len(toks) < 8:
            x[list(eos)] = -np.inf
        return int(np.argmax(x))

    want, _ = Stepper(session).run(p, 12, masked, eos=eos)
    assert held.tokens == want and len(held.tokens) >= 8
    assert not set(held.tokens[:8]) & eos


def test_n_choices_fork_one_prefill_and_are_reproducible_by_seed(session, reference):
    """n = 3 in one group: one prefill (the others forked from its KV row), greedy choices all equal the
    reference; seeded sampled choices are the same on a second run, choice 0 equals the n = 1 request of that
    seed, choice i uses seed + i, and the choices differ from each other."""
    def group(p, n, **kw):
        first = seq(p, 10, **kw)
        first.siblings = [ls.Sequence(list(p), first.params, ls.TextStream(lambda ids: "", []), index=i)
                          for i in range(1, n)]
        return first

    p = prompt(11, 7)
    sched = make_scheduler(session, rows=6)
    greedy = group(p, 3)
    company = seq(prompt(5, 1), 7)
    sched.submit(company)
    sched.submit(greedy)
    _, _, stats = sched.step()
    assert stats.prefilled == 2  # two prompts prefilled, the two other choices forked
    run_all(sched, {0: []})
    assert all(c.tokens == reference(p, 10) for c in greedy.group)
    assert sched.reserved == 0 and len(sched.free_rows) == 6

    def sampled(seed, n):
        s = make_scheduler(session, rows=6)
        g = group(p, n, temperature=1.0, seed=seed)
        run_all(s, {0: [g]})
        return [c.tokens for c in g.group]

    first, again = sampled(77, 3), sampled(77, 3)
    assert first == again and len({tuple(t) for t in first}) == 3
    assert sampled(77, 1) == first[:1] and sampled(78, 1) == first[1:2]
    with pytest.raises(ls.RequestError, match="num_return_sequences"):
        make_scheduler(session, rows=2).submit(group(p, 3))


def test_sampling_params_are_validated():
    for kw, needle in [({"presence_penalty": 3.0}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition"),
                       ({"min_tokens": 11}, "min_tokens"), ({"logit_bias": {5: 101.0}}, "logit_bias"),
                       ({"logit_bias": {900: 1.0}}, "outside the vocabulary"), ({"n": 0}, "num_return_sequences"),
                       ({"top_logprobs": 21}, "top_logprobs"), ({"top_k": -2}, "top_k")]:
        with pytest.raises(ls.RequestError, match=needle):
            ls.SamplingParams(max_tokens=10, **kw).validate(64, vocab=800)


def _reference_draw(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng) -> int:
    """The textbook sampler over the whole vocabulary — float64 softmax, a full stable sort, top-k then top-p,
    numpy's Generator.choice — which `sample_rows` must reproduce draw for draw without sorting the vocabulary."""
    if temperature <= 0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    p = np.exp(x - x.max())
    order = np.argsort(-p, kind="stable")
    if 0 < top_k < p.size:
        order = order[:top_k]
    kept = p[order] / p[order].sum()
    if top_p < 1.0:
        order = order[: int(np.searchsorted(np.cumsum(kept), top_p)) + 1]
    q = np.zeros_like(p)
    q[order] = p[order]
    return int(rng.choice(p.size, p=q / q.sum()))


def test_batched_sampling_draws_what_the_whole_vocabulary_sampler_draws():
    """Mixed batches (greedy, plain, top-p, top-k, both) over peaked and flat logits, several steps: every row's
    token equals the reference sampler's with the same seed, so cutting candidates and the two-level inverse CDF
    change nothing, and a row's draw does not depend on its company."""
    rng = np.random.default_rng(3)
    settings = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 5), (0.8, 0.5, 40), (2.0, 0.99, 0),
                (1.0, 1.0, 1), (0.5, 0.01, 0)]
    draws = 0
    for vocab in (9, 3000, 20000):
        ranks = np.arange(1, vocab + 1)
        for trial in range(6):
            peaked = trial % 2 == 0
            logits = np.stack([
                -1.2 * np.log(ranks)[rng.permutation(vocab)] * 3 if peaked else rng.standard_normal(vocab) * 2
                for _ in settings]).astype(np.float32)
            seeds = rng.integers(1 << 40, size=len(settings))
            batch = [ls.Sampler(t, p, int(s), k) for (t, p, k), s in zip(settings, seeds, strict=True)]
            refs = [np.random.default_rng(int(s)) for s in seeds]
            scratch: dict = {}
            for _ in range(3):
                got = ls.sample_rows(batch, logits, scratch)
                want = [_reference_draw(logits[i], *settings[i], refs[i]) for i in range(len(settings))]
                assert got.tolist() == want, (vocab, trial)
                draws += len(settings)
                logits = np.roll(logits, 1, axis=1)
    assert draws == 3 * 6 * 3 * len(settings)
    one = ls.Sampler(1.3, 1.0, 5, 2)
    picks = {one(np.array([0.0, 3.0, 1.0, 2.9], np.float32)) for _ in range(50)}
    assert picks == {1, 3}  # top_k 2: only the two most likely tokens, both drawn


def test_bucketed_nucleus_is_the_sorted_one():
    """A top-p cut over many candidates is found by bucketing their probabilities (near-flat rows of a 152 k
    vocabulary kept most of it, and a full sort per row was most of a decode step): the same positions as sorting
    them all, over flat, peaked, tied (values repeated across the crossing) and zero-holding rows and cuts from a
    sliver to everything; a top_k cut from a partition is the sort's; and sample_rows draws the same tokens through
    either path."""
    rng = np.random.default_rng(11)
    rows = [np.exp(rng.standard_normal(20000) * sigma).astype(np.float32) for sigma in (0.1, 0.5, 2.0, 4.0)]
    rows.append(np.repeat(rng.random(500).astype(np.float32), 40))  # ties everywhere
    rows.append(np.where(rng.random(30000) < 0.5, 0.0, rng.random(30000)).astype(np.float32))  # half zeros
    checked = 0
    for p in rows:
        total = float(p.sum(dtype=np.float64))
        for top_p in (0.001, 0.3, 0.9, 0.95, 0.999, 1.0):
            need = total * top_p
            order = np.argsort(-p, kind="stable")
            c = np.cumsum(p[order], dtype=np.float64)
            want = np.sort(order[: int(np.searchsorted(c, need)) + 1])
            np.testing.assert_array_equal(ls._nucleus_bucketed(p, need), want)
            checked += 1
    assert checked == 36
    for p in rows:  # top_k from a partition: the first k of the stable sort, ties included
        for k in (1, 50, 4097, p.size):
            np.testing.assert_array_equal(ls._top_k(p, k), np.argsort(-p, kind="stable")[:k])
    logits = (rng.standard_normal((6, 151936)) * 0.45).astype(np.float32)  # near-flat: every row takes the bucket path
    draws = {}
    for bucketed_from in (4096, 10**9):
        batch = [ls.Sampler(0.6, 0.95, seed, 50 if seed % 2 else 0) for seed in range(6)]
        old, ls._BUCKETED_FROM = ls._BUCKETED_FROM, bucketed_from
        try:
            draws[bucketed_from] = [ls.sample_rows(batch, logits).tolist() for _ in range(3)]
        finally:
            ls._BUCKETED_FROM = old
    assert draws[4096] == draws[10**9]


# ---- structured output -----------------------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "n": {"type": "integer",
          "minimum": 0, "maximum": 99}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
          "maxItems": 2}}, "required": ["color", "n", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny_tok(exported, session_workdir):
    from tokenizers import Tokenizer

    from exporter.core.artifacts import ModelLayout

    exported("r1-distill-tiny")
    path = ModelLayout(session_workdir, "r1-distill-tiny").tokenizer_dir / "tokenizer.json"
    return Tokenizer.from_file(str(path)), path


def test_a_json_schema_guide_constrains_its_row_only_and_leaves_the_thought_free(session, reference, tiny_tok):
    """Three rows in one batch: a guided row without a think block (all of it is JSON that validates), a guided
    row whose prompt opens a think block (the thought is the unconstrained greedy one up to `</think>`, then JSON
    that validates), and an unguided row (the plain greedy tokens)."""
    import json

    import guided
    import jsonschema

    from exporter import tiny_models

    tok, path = tiny_tok
    eos = {tok.token_to_id(tiny_models.EOS)}
    think_end = tok.token_to_id("</think>")
    factory = guided.GuideFactory(str(path), sorted(eos), tok.token_to_id("<think>"), think_end)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=False)  # noqa: E731
    plain_prompt = tok.encode("Answer in JSON: ").ids
    chat_prompt = tok.encode(tiny_models.chat_prompt("What is a KV cache?")).ids
    sched = make_scheduler(session, rows=4, eos=eos)
    free = ls.Sequence(plain_prompt, ls.SamplingParams(max_tokens=120), ls.TextStream(decode, []))
    flat = ls.Sequence(plain_prompt, ls.SamplingParams(max_tokens=120), ls.TextStream(decode, []))
    thinking = ls.Sequence(chat_prompt, ls.SamplingParams(max_tokens=200), ls.TextStream(decode, []))
    flat.guide = factory.guide("json_schema", json.dumps(SCHEMA), plain_prompt)
    thinking.guide = factory.guide("json_schema", json.dumps(SCHEMA), chat_prompt)
    assert flat.guide.active and not thinking.guide.active
    run_all(sched, {0: [free, flat, thinking]})
    assert free.tokens == reference(plain_prompt, 120, eos)
    assert flat.finish_reason == "eos"
    jsonschema.validate(json.loads(decode(flat.tokens)), SCHEMA)
    assert thinking.finish_reason == "eos" and think_end in thinking.tokens
    cut = thinking.tokens.index(think_end) + 1
    assert thinking.tokens[:cut] == reference(chat_prompt, 200, eos)[:cut]  # the thought is free
    jsonschema.validate(json.loads(decode(thinking.tokens[cut:])), SCHEMA)
    with pytest.raises(guided.GuideError, match="not usable"):
        factory.guide("json_schema", "{not json", plain_prompt)
    with pytest.raises(guided.GuideError, match="must be one of"):
        factory.guide("yaml", "", plain_prompt)


# ---- prefix reuse ----------------------------------------------------------------------------------------------
def _fused_engine(exported_fused, rows):
    import kv_shared

    return kv_shared.SharedKVEngine.from_path(exported_fused("r1-distill-tiny").onnx_path, rows, 512, 1)


@pytest.mark.parametrize("graph", ["generic", "fused"])
def test_prefix_reuse_gives_exactly_the_outputs_without_it(session, exported_fused, graph):
    """Conversations sharing a 70-token system prefix, each over three turns (each turn's prompt extends the
    last), greedy and seeded-sampled, arriving in waves over 4 rows: token for token what the same requests get
    with no prefix cache; the cache hit what it should (the shared prefix and the earlier turns, block by block),
    and never holds more than its budget."""
    system = prompt(70, 40)

    def requests():
        out = {}
        for conv in range(4):
            history = system + prompt(9 + conv, conv)
            for turn in range(3):
                kw = {"temperature": 0.8, "seed": 10 * conv + turn} if conv % 2 else {}
                out.setdefault(3 * turn + conv % 2, []).append(seq(history, 6, **kw))
                history = history + prompt(20, 7 * conv + turn)
        return out

    def run(cache_tokens):
        rows = 4
        engine = make_engine(session, rows) if graph == "generic" else _fused_engine(exported_fused, rows)
        limits = ls.Limits(max_rows=rows, kv_budget_tokens=100_000, max_queue=64, max_sequence_len=512,
                           prefix_cache_tokens=cache_tokens)
        sched = ls.Scheduler(engine, limits, set())
        arrivals = requests()
        run_all(sched, arrivals)
        return [s.tokens for k in sorted(arrivals) for s in arrivals[k]], sched

    without, _ = run(0)
    with_cache, sched = run(4096)
    assert with_cache == without
    cache = sched.prefix
    # the first prompt misses; every later one finds at least the 64 tokens of the shared system prefix
    assert cache.hit_tokens >= 64 * 11 and 0 < cache.hit_rate < 1
    _, small = run(64)  # 4 blocks of 16 tokens: eviction keeps it bounded, outputs still equal
    assert len(small.prefix.blocks) <= 4
    assert run(64)[0] == without


def test_prefix_cache_matches_whole_blocks_of_the_same_prefix_only():
    """The cache on its own with a stand-in engine (its blocks are opaque): only whole blocks, only after the very
    same earlier blocks, the last prompt token always left to compute, least recently used evicted first."""
    class Blocks:
        def kv_blocks(self, row, start, end):
            return (row, start, end)

    cache, engine = ls.PrefixCache(max_blocks=3, block=4), Blocks()
    a = list(range(10))
    assert cache.match(a) == []
    cache.store(a, 0, 7, engine)  # blocks [0:4], [4:8]
    assert cache.match(a) == [(7, 0, 4), (7, 4, 8)]
    assert cache.match(a[:8]) == [(7, 0, 4)]  # 8 tokens: the second block would leave nothing to compute
    assert cache.match([99] + a[1:]) == []  # another first block: nothing after it is reused
    # 2 more blocks: the least recently used ([4:8] of a: the last match touched only [0:4]) is evicted
    cache.store([99] + a[1:], 0, 8, engine)
    assert len(cache.blocks) == 3 and cache.match(a) == [(7, 0, 4)]
    assert cache.hit_tokens == 16 and cache.query_tokens == 48 and cache.hit_rate == 16 / 48


def test_batched_masks_equal_each_guides_own(tiny_tok):
    """guided.masks fills every row in one xgrammar batch call: bit for bit what each matcher allows alone, for
    guides in different states, and nothing past the tokenizer's vocabulary."""
    import json

    import guided
    import xgrammar as xgr

    tok, path = tiny_tok
    factory = guided.GuideFactory(str(path), [1], None, None)
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                         "required": ["a", "b"]})
    guides = [factory.guide("json_schema", schema, [5]) for _ in range(3)]
    for g, text in zip(guides[1:], ['{"a": 1', '{"a": 12, "b": "x'], strict=True):
        for t in tok.encode(text, add_special_tokens=False).ids:
            g.accept(t)
    vocab = guides[0].vocab + 6
    got = guided.masks(guides, vocab)
    counts = []
    for row, g in zip(got, guides, strict=True):
        alone = xgr.allocate_token_bitmask(1, g.vocab)
        g.matcher.fill_next_token_bitmask(alone, 0)
        want = np.unpackbits(alone.numpy().view(np.uint8), axis=1, bitorder="little")[0, : g.vocab].astype(bool)
        assert np.array_equal(row[: g.vocab], want) and not row[g.vocab :].any()
        counts.append(int(want.sum()))
    assert counts[0] < counts[1] < counts[2]  # '{' only; a digit or ',' or '}'; almost any token inside a string
