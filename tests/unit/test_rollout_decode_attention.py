"""The rollout engine's decode attention: torch's products and the C++ kernel against a float64 loop, the kernel's
input checks, and which of the two the engine picks (with a build that fails)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from posttrain.rollout import decode_attention as decode
from posttrain.rollout.decode_attention import decode_attention, kernel_attention, kernel_ops, torch_attention

# (prompts m, rows per prompt n, kv heads, heads, prompt width P, head_dim D, new slots T, slots read)
SHAPES = [(3, 2, 2, 4, 7, 16, 5, 3), (5, 1, 8, 8, 40, 64, 32, 1), (2, 4, 1, 8, 9, 128, 6, 6),
          (4, 3, 4, 12, 20, 80, 8, 0), (1, 1, 2, 2, 3, 256, 2, 2)]


def _problem(m, n, kv, heads, width, dim, slots, count, seed=0):
    """Random caches laid out as the decoder keeps them: each prompt's keys in its last `length` slots, zeros on its
    left padding (one prompt fills its width, one has a single token), the new tokens' slots beyond `count`
    garbage that must not be read."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (m,), generator=generator)
    lengths[0] = width
    lengths[-1] = 1 if m > 1 else width
    padding = torch.arange(width) < width - lengths[:, None]
    bias = torch.zeros(m, width).masked_fill_(padding, float("-inf"))
    prompt_keys, prompt_values = (torch.randn(m, kv, width, dim, generator=generator).masked_fill_(
        padding[:, None, :, None], 0.0) for _ in range(2))
    new_keys, new_values = (torch.randn(m * n, kv, slots, dim, generator=generator) for _ in range(2))
    new_keys[:, :, count:] = float("nan")  # unread slots: a NaN read there would show in every output
    new_values[:, :, count:] = float("nan")
    q = torch.randn(m * n, heads, dim, generator=generator)
    return q, prompt_keys, prompt_values, bias, lengths, new_keys, new_values, count, n


def _float64_loop(q, prompt_keys, prompt_values, bias, lengths, new_keys, new_values, count, n):
    """softmax(q k^T) v for one row and head at a time, over its prompt's real slots and its first `count` new ones."""
    rows, heads, dim = q.shape
    kv, width = prompt_keys.shape[1], prompt_keys.shape[2]
    out = torch.zeros(rows, heads, dim, dtype=torch.float64)
    for r in range(rows):
        p = r // n
        for h in range(heads):
            g = h // (heads // kv)
            keys = torch.cat([prompt_keys[p, g, width - lengths[p]:], new_keys[r, g, :count]]).double()
            values = torch.cat([prompt_values[p, g, width - lengths[p]:], new_values[r, g, :count]]).double()
            weights = torch.softmax(keys @ q[r, h].double(), dim=0)
            out[r, h] = weights @ values
    return out


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_both_ways_compute_the_float64_attention_up_to_fp32_rounding(shape):
    problem = _problem(*shape)
    expected = _float64_loop(*problem)
    # The kernel never reads a prompt's left padding: NaN there would show. torch's products multiply it by a -inf
    # bias, so they get the zeros the decoder's caches hold there.
    q, prompt_keys, prompt_values, bias, *rest = problem
    padding = bias.isinf()[:, None, :, None]
    unread = (q, prompt_keys.masked_fill(padding, float("nan")), prompt_values.masked_fill(padding, float("nan")),
              bias, *rest)
    for attention, arguments in ((torch_attention, problem), (kernel_attention, unread)):
        out = attention(*arguments)
        assert out.shape == expected.shape and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6 * max(1.0, expected.abs().max().item()))


def test_the_kernel_refuses_what_it_would_read_out_of_bounds():
    q, pk, pv, bias, lengths, nk, nv, count, n = _problem(3, 2, 2, 4, 7, 16, 5, 3)
    ops = kernel_ops()
    bad = {  # each refused with the message of the check it fails
        "prompt lengths": (q, pk, lengths + 7, nk, count, n),           # longer than the cache's width
        "prompt lengths ": (q, pk, lengths - 8, nk, count, n),          # negative
        "count": (q, pk, lengths, nk, 6, n),                             # more new slots than the cache has
        "rows": (q, pk, lengths, nk, count, 3),                          # 3 prompts x 3 rows is not 6 rows
        "heads": (q[:, :3].contiguous(), pk, lengths, nk, count, n),     # 3 heads over 2 kv heads
        "heads ": (q, pk, lengths, nk[:, :1].contiguous(), count, n),    # the new tokens' cache has 1 kv head
        "contiguous fp32": (q.transpose(0, 1).contiguous().transpose(0, 1), pk, lengths, nk, count, n),
        "contiguous fp32 ": (q.double(), pk, lengths, nk, count, n),
        "int64 prompt lengths": (q, pk, lengths.int(), nk, count, n),
        "head_dim": (q[..., :8].contiguous(), pk[..., :8].contiguous(), lengths, nk[..., :8].contiguous(), count, n),
        "head_dim ": (torch.cat([q, q], -1), pk, lengths, nk, count, n),  # queries of 32 against keys of 16
    }
    for message, arguments in bad.items():
        with pytest.raises(RuntimeError, match=f"decode attention: {message.strip()}"):
            ops.decode_scores(*arguments)
    scores = ops.decode_scores(q, pk, lengths, nk, count, n)
    with pytest.raises(RuntimeError, match="decode attention: probabilities' width"):
        ops.decode_mix(scores[..., :-1].contiguous(), pv, lengths, nv, count, n)
    with pytest.raises(RuntimeError, match="decode attention: contiguous fp32"):
        ops.decode_mix(scores, pv.transpose(2, 3), lengths, nv, count, n)
    with pytest.raises(RuntimeError, match="decode attention: prompt lengths"):
        ops.decode_mix(scores.softmax(-1), pv, lengths + 7, nv, count, n)


def test_the_engine_picks_torch_where_the_kernel_does_not_apply_or_is_turned_off(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", "1")
    assert decode_attention(cpu, torch.float32, 64) is kernel_attention
    for dtype, dim in ((torch.bfloat16, 64), (torch.float64, 64), (torch.float32, 72), (torch.float32, 512)):
        assert decode_attention(cpu, dtype, dim) is torch_attention
    assert decode_attention(torch.device("meta"), torch.float32, 64) is torch_attention
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", "0")
    assert decode_attention(cpu, torch.float32, 64) is torch_attention
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", "yes")
    with pytest.raises(ValueError, match="POSTTRAIN_DECODE_KERNEL must be auto, 0 or 1"):
        decode_attention(cpu, torch.float32, 64)


def test_auto_uses_the_kernel_where_this_machine_measured_it_faster(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_DECODE_KERNEL", "auto")
    cpu = torch.device("cpu")
    for answer, expected in (("kernel", kernel_attention), ("torch", torch_attention)):
        monkeypatch.setattr(decode, "measured_choice", lambda name, options, measure, answer=answer: answer)
        assert decode_attention(cpu, torch.float32, 64) is expected


@pytest.mark.parametrize(("kernel", "torch_", "faster"), [(1.0, 2.0, "kernel"), (2.0, 1.0, "torch")])
def test_the_measurement_runs_both_ways_and_keeps_the_faster(monkeypatch, kernel, torch_, faster):
    ran = []

    def timed(runs):
        for way, run in runs.items():
            run()  # every call of both ways runs, on the measurement's shapes
            ran.append(way)
        return {"kernel": kernel, "torch": torch_}

    monkeypatch.setattr(decode, "best_seconds", timed)
    assert decode._measure() == faster and sorted(ran) == ["kernel", "torch"]


def test_a_kernel_that_cannot_be_built_leaves_torch_under_auto_and_is_an_error_under_1(tmp_path):
    """A fresh process whose compiler fails (CXX=false) and whose extension and choice caches are empty: `auto` warns
    once and samples with torch's products; `1` fails where the engine is set up."""
    script = textwrap.dedent("""
        import os, sys, warnings, torch
        from posttrain.rollout.decode_attention import decode_attention, torch_attention
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chosen = [decode_attention(torch.device("cpu"), torch.float32, 64) for _ in range(2)]
        assert chosen == [torch_attention, torch_attention], chosen
        ours = [w for w in caught if "could not be built" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        os.environ["POSTTRAIN_DECODE_KERNEL"] = "1"
        try:
            decode_attention(torch.device("cpu"), torch.float32, 64)
        except RuntimeError as error:
            assert "POSTTRAIN_DECODE_KERNEL=1" in str(error), error
            print("refused:", str(error).splitlines()[0])
        else:
            sys.exit("POSTTRAIN_DECODE_KERNEL=1 did not fail")
    """)
    env = {**os.environ, "CXX": "false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "POSTTRAIN_CACHE_DIR": str(tmp_path / "choices"), "POSTTRAIN_DECODE_KERNEL": "auto"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused:" in result.stdout


def test_a_lock_left_by_a_builder_that_died_does_not_hang_the_next_build_and_another_install_does_not_rebuild(
        tmp_path):
    """torch's builder waits without a timeout on a lock file a killed builder leaves; the kernel's own lock, which
    the system releases with its holder, lets the next process remove it and build. A second install of the same
    source (another checkout: the source at another path) loads that build instead of compiling its own.

    In the machine's extension cache, where the suite's engines load the kernel from (torch's builder takes its lock
    file, and runs ninja, even where nothing is to build): a directory of its own would compile the kernel again."""
    kernel_ops()  # built here if no test before it was
    directory = decode.build_directory()
    script = textwrap.dedent("""
        import fcntl, sys, torch
        from pathlib import Path
        from posttrain.rollout import decode_attention as decode
        directory = decode.build_directory()
        if sys.argv[1] == "stale-lock":
            # Planted as a builder holds the kernel's lock (none is in torch's builder meanwhile), just before the
            # call: another process's build in between would remove it
            with open(directory / "posttrain.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                (directory / "lock").touch()  # what a builder killed mid-build leaves
        else:
            decode.SOURCE = Path(sys.argv[1])  # the same text, installed elsewhere
        ops = decode.kernel_ops()
        q = torch.ones(1, 1, 16)
        keys = torch.ones(1, 1, 2, 16)
        scores = ops.decode_scores(q, keys, torch.tensor([2]), torch.ones(1, 1, 1, 16), 1, 1)
        print("scores", scores.flatten().tolist())
    """)
    elsewhere = tmp_path / "elsewhere" / decode.SOURCE.name
    elsewhere.parent.mkdir()
    shutil.copy(decode.SOURCE, elsewhere)
    library = next(directory.glob("*.so"))
    built = library.stat().st_mtime_ns
    for argument in ("stale-lock", str(elsewhere)):
        result = subprocess.run([sys.executable, "-c", script, argument], capture_output=True, text=True, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "scores [16.0, 16.0, 16.0]" in result.stdout  # two prompt slots and one new one, each 16 ones . 16 ones
        assert not (directory / "lock").exists()
        assert library.stat().st_mtime_ns == built  # loaded, not written again
