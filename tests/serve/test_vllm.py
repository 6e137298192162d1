"""dyncompile inside vLLM (run by ``make serve-test`` in vLLM's venv; skipped elsewhere).

A random-init Llama written from a config; vLLM's own dense engine is the reference:
at budget 1.0 the greedy tokens are identical, at TP=1 and TP=2; below it each worker
spends less; the budget changes while serving without a recompile; requests carry
their own budgets through one batch.
"""

import random

import pytest

vllm = pytest.importorskip("vllm")

from dyncompile.integrations import vllm as dynv  # noqa: E402
from dyncompile.testing.llama_shapes import SHAPES, save  # noqa: E402

VOCAB = 4096
LAYERS = SHAPES["tiny"]["num_hidden_layers"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save("tiny", str(tmp_path_factory.mktemp("llama") / "tiny"), vocab=VOCAB)


def _prompts(n, length, seed):
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(length)]}
            for _ in range(n)]


def _engine(path, tp, compilation_config=None):
    kwargs = dict(model=path, skip_tokenizer_init=True, dtype="float32", max_model_len=256,
                  tensor_parallel_size=tp, max_num_seqs=8, seed=0)
    if compilation_config is not None:
        kwargs["compilation_config"] = compilation_config
    return vllm.LLM(**kwargs)


def _tokens(llm, prompts, n=12):
    sp = vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def _close(llm):
    llm.llm_engine.engine_core.shutdown()


def _check_engine(model_dir, tp, dyn_config, calibrate):
    prompts = _prompts(4, 10, seed=2)
    dense = _engine(model_dir, tp)
    reference = _tokens(dense, prompts)
    _close(dense)
    llm = _engine(model_dir, tp, dyn_config)
    try:
        first = dynv.stats(llm)
        assert len(first) == tp
        # Every linear of every layer (q/k/v fused, o, gate/up fused, down) became gated.
        assert all(w["rewritten"] == {"gated": 4 * LAYERS} for w in first)
        calibrate(llm)
        assert all(w["calibrated"] for w in dynv.stats(llm))
        dynv.set_budget(llm, 1.0)
        assert _tokens(llm, prompts) == reference
        dynv.set_budget(llm, 0.5)
        dynv.stats(llm, reset=True)
        half = _tokens(llm, prompts[:1])
        spent = dynv.stats(llm)
        assert len(half[0]) == 12
        # Each rank skips its own share of its shard's work.
        assert all(0.3 < w["spent"] < 0.85 for w in spent), spent
        dynv.set_budget(llm, 1.0)
        assert _tokens(llm, prompts) == reference
        # Per-request budgets in one batch: requests 1 and 3 at 0.3, the others at the
        # engine's 1.0: those keep vLLM's dense tokens; the kept pairs fall in between.
        dynv.stats(llm, reset=True)
        sp = [vllm.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                  detokenize=False,
                                  extra_args=dynv.request_budget(0.3) if i % 2 else None)
              for i in range(len(prompts))]
        mixed = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp,
                                                                     use_tqdm=False)]
        assert mixed[0] == reference[0] and mixed[2] == reference[2]
        assert all(0.45 < w["active"] < 0.95 for w in dynv.stats(llm)), dynv.stats(llm)
        assert all(w["graphs"] == 1 for w in dynv.stats(llm))  # no recompile
    finally:
        _close(llm)


def _explicit(llm):
    dynv.calibrate(llm, _prompts(8, 32, seed=1), max_tokens=8)


def _first_requests(llm):
    assert not any(w["calibrated"] for w in dynv.stats(llm))
    _tokens(llm, _prompts(8, 32, seed=1), n=8)  # 8 x 32 prompt tokens > 200


@pytest.mark.parametrize("calibration", ["explicit", "first_requests"])
def test_tp1_budget_one_equals_vllm_dense_and_compute_falls(model_dir, calibration):
    if calibration == "explicit":
        _check_engine(model_dir, 1, dynv.config(methods=["gated"]), _explicit)
    else:
        _check_engine(model_dir, 1, dynv.config(methods=["gated"], calibrate_first_tokens=200),
                      _first_requests)


def test_tp2_budget_one_equals_vllm_dense_and_compute_falls(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    _check_engine(model_dir, 2, dynv.config(methods=["gated"]), _explicit)
