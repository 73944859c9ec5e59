"""apd bench on a noisy machine: interleaved rounds, medians, paired speed-ups
and the reported spread (pure Python: fake runners with a scripted load)."""
import pytest

from apd_ext.decoding import bench


def _fake(name, true_ms, load, log):
    """A runner whose round-r time is true_ms * load[r] (the machine's load in
    that round); round -1 is the warm-up."""
    state = {"calls": 0}

    def run():
        r = state["calls"] - 1
        state["calls"] += 1
        log.append((name, r))
        f = load[r] if r >= 0 else 10.0
        return bench._sample(sec=true_ms * f * 4 / 1e3, steps=4, gen=32)

    return run


def test_rounds_rotate_and_warm_up_once():
    log = []
    load = [1.0] * 4
    runners = {n: _fake(n, 1.0, load, log) for n in ("a", "b", "c")}
    out = bench.interleaved(runners, 4)
    assert [len(v) for v in out.values()] == [4, 4, 4]
    assert log[:3] == [("a", -1), ("b", -1), ("c", -1)]  # warm-ups, not counted
    order = [n for n, _ in log[3:]]
    assert order == list("abc" "bca" "cab" "abc")


def test_paired_speedup_is_immune_to_load_between_rounds():
    # The load changes 5x between rounds; within a round both see the same load.
    load = [1.0, 5.0, 1.0, 3.0, 5.0]
    log = []
    out = bench.interleaved({"apd": _fake("apd", 1.0, load, log), "ref": _fake("ref", 2.5, load, log)}, 5)
    med, lo, hi = bench.paired_speedup(out["apd"], out["ref"])
    assert med == pytest.approx(2.5) and lo == pytest.approx(2.5) and hi == pytest.approx(2.5)
    row = bench._row({}, "apd", out["apd"])
    # The spread shows the noise that the paired ratio removed.
    assert row["ms_step"] == pytest.approx(3.0) and row["ms_step_min"] == pytest.approx(1.0)
    assert row["ms_step_max"] == pytest.approx(5.0) and row["repeats"] == 5
    assert row["tokens_per_step"] == 8


def test_unpaired_rounds_would_differ():
    """The pairing matters: misaligned rounds give a different, wrong ratio."""
    load = [1.0, 5.0, 2.0]
    out = bench.interleaved({"apd": _fake("apd", 1.0, load, []), "ref": _fake("ref", 2.5, load, [])}, 3)
    shifted, _, _ = bench.paired_speedup(out["apd"], out["ref"][1:] + out["ref"][:1])
    assert shifted != pytest.approx(2.5)


def test_table_prints_the_spread(capsys):
    base = dict(device="cpu", shapes="tiny", config="(0.7, 16, 100)", accept=8, floor_ms=0.1)
    load = [1.0, 2.0, 1.5]
    out = bench.interleaved({"apd": _fake("apd", 1.0, load, []), "ref": _fake("ref", 2.0, load, [])}, 3)
    row = bench._row(base, "apd", out["apd"])
    row["speedup_vs_reference"], row["speedup_min"], row["speedup_max"] = bench.paired_speedup(out["apd"],
                                                                                               out["ref"])
    bench.print_table([row], None)
    text = capsys.readouterr().out
    assert "medians of 3 interleaved rounds" in text
    assert "1.00..2.00" in text and "2.00x" in text and "2.00..2.00x" in text
