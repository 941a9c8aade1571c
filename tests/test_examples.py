"""The examples run for real: 4 ranks on CPU through a launcher (pyccl.launch or torchrun), and
their results are compared with single-process references computed here.

* examples/tp_pp_train.py: the loss falls, the gathered parameters after the run equal the
  single-process training to float tolerance (rtol 1e-4, atol 1e-5), data-parallel replicas and
  tensor-parallel copies of replicated parameters agree; tp 2 x pp 2 and tp 2 x dp 2 on pyccl,
  pp 2 x dp 2 on gloo (under torchrun).
* examples/moe_inference.py: generated tokens and final logits are bitwise equal to the
  single-process simulation of the same ranks, close to the dense (no-dispatch) reference,
  and the dispatch really used uneven splits; on pyccl and on gloo (under torchrun).
* --profile prints per-collective tables.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import moe_inference
import tp_pp_train

RANKS = 4
SMALL = ["--steps", "12", "--warmup", "1"]          # the rest: the examples' small defaults


def launch(script, args, tmp_path, launcher="pyccl", timeout=60):
    """Run examples/<script> on RANKS ranks; returns (stdout, the --out results)."""
    out = tmp_path / f"{script}.{launcher}.pt"
    prog = [str(EXAMPLES / script), *args, "--out", str(out)]
    if launcher == "pyccl":
        cmd = [sys.executable, "-m", "pyccl.launch", "-n", str(RANKS), *prog]
    else:   # --standalone: a free port of its own, never 29500 (other jobs may share this host)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS), *prog]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYCCL_", "TORCHELASTIC_")) and k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYCCL_TIMEOUT="60")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout, torch.load(out)


@pytest.fixture
def one_thread():
    """The references run with one thread like each rank (bitwise equality needs the same kernels)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def check_training(args, res, layout):
    a = tp_pp_train.parse(args)
    ref = tp_pp_train.reference(a)
    assert res["layout"] == layout
    losses = res["losses"]
    assert len(losses) == a.steps
    assert losses[-1] < 0.85 * losses[0], f"loss did not fall: {losses}"
    assert losses == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    worst = tp_pp_train.compare(res["params"], ref["params"], rtol=1e-4, atol=1e-5)
    assert worst <= 1e-5, f"parameters differ from the single-process run: max(|d| - rtol|ref|) = {worst}"
    assert res["divergence"] <= 1e-6, f"replicas / tp copies disagree by {res['divergence']}"
    # the initial parameters are far from the trained ones: the comparison has teeth
    init = tp_pp_train.reference(tp_pp_train.parse(args[:args.index("--steps")] + ["--steps", "0"]))["params"]
    assert tp_pp_train.compare(init, ref["params"]) > 1e-2


@pytest.mark.timeout(90)
def test_train_tp2_pp2_pyccl(tmp_path, one_thread):
    args = ["--tp", "2", "--pp", "2", *SMALL]
    stdout, res = launch("tp_pp_train.py", args + ["--profile"], tmp_path)
    check_training(args, res, dict(world=4, tp=2, pp=2, dp=1, backend="pyccl"))
    assert "step  12/12" in stdout
    for kind in ("all_reduce tp-fwd", "all_reduce tp-bwd", "send+recv", "all collectives"):
        assert kind in stdout, f"--profile table lacks {kind!r}:\n{stdout}"
    assert stdout.count("profile rank") == RANKS


@pytest.mark.timeout(90)
def test_train_tp2_dp2_pyccl(tmp_path, one_thread):
    args = ["--tp", "2", "--pp", "1", *SMALL]
    stdout, res = launch("tp_pp_train.py", args + ["--profile"], tmp_path)
    check_training(args, res, dict(world=4, tp=2, pp=1, dp=2, backend="pyccl"))
    assert "all_reduce dp-grads" in stdout


@pytest.mark.timeout(90)
def test_train_pp2_dp2_gloo_torchrun(tmp_path, one_thread):
    args = ["--tp", "1", "--pp", "2", *SMALL, "--backend", "gloo"]
    _, res = launch("tp_pp_train.py", args, tmp_path, launcher="torchrun")
    check_training(args, res, dict(world=4, tp=1, pp=2, dp=2, backend="gloo"))


def check_moe(args, res):
    a = moe_inference.parse(args)
    ref = moe_inference.reference(a, RANKS)
    assert res["tokens"].shape == (a.batch, a.new_tokens)
    assert torch.equal(res["tokens"], ref["tokens"]), f"{res['tokens']}\n!=\n{ref['tokens']}"
    assert torch.equal(res["logits"], ref["logits"]), \
        f"logits differ by up to {(res['logits'] - ref['logits']).abs().max().item()}"
    assert res["splits"] == ref["splits"]
    dense = moe_inference.reference(a, 1, dense=True)
    assert torch.equal(res["tokens"], dense["tokens"])
    torch.testing.assert_close(res["logits"], dense["logits"], rtol=1e-4, atol=1e-5)
    # every all-to-all of rows had uneven splits somewhere, some rank sent nothing to some rank
    calls = res["splits"]
    assert len(calls) == a.layers * a.new_tokens
    assert all(len({n for row in c for n in row}) > 1 for c in calls)
    assert any(0 in row for c in calls for row in c)


@pytest.mark.timeout(60)
def test_moe_pyccl(tmp_path, one_thread):
    args = ["--warmup", "1"]
    stdout, res = launch("moe_inference.py", args + ["--profile"], tmp_path)
    check_moe(args, res)
    assert res["layout"]["backend"] == "pyccl"
    assert "tokens/s" in stdout and "all-to-all" in stdout and "% of the time" in stdout
    assert "step  8/8" in stdout
    for kind in ("all_to_all counts", "all_to_all dispatch", "all_to_all combine"):
        assert kind in stdout


@pytest.mark.timeout(60)
def test_moe_window_dispatch(tmp_path, one_thread):
    """--dispatch window (one-sided puts, issue 30) gives bitwise the all_to_all dispatch's output."""
    args = ["--warmup", "0", "--dispatch", "window"]
    stdout, res = launch("moe_inference.py", args + ["--profile"], tmp_path)
    check_moe(args, res)
    for kind in ("window counts", "window dispatch", "window combine"):
        assert kind in stdout


@pytest.mark.timeout(60)
def test_moe_gloo_torchrun(tmp_path, one_thread):
    args = ["--backend", "gloo", "--warmup", "0", "--seed", "7"]
    _, res = launch("moe_inference.py", args, tmp_path, launcher="torchrun")
    check_moe(args, res)
    assert res["layout"]["backend"] == "gloo"
