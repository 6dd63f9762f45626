"""`sftplug bench linear-attention`: forward/backward time of every linear-attention backend that
runs here, its difference from the PyTorch form, and why not the others."""

import json

from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.diagnostics.linear_attention_bench import format_table, run_linear_attention_bench
from sftplug.linear_attention.backend import LinearAttentionBackend


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


class Scaled(LinearAttentionBackend):
    """A backend whose output is the PyTorch form's times 1.5: the bench must say how far off it is."""

    name = "scaled"

    def __call__(self, q, k, v, g, beta, doc_ids=None):
        from sftplug.linear_attention.pytorch import gated_delta_rule

        return 1.5 * gated_delta_rule(q, k, v, g, beta, doc_ids)


class Offers:
    def select_linear_attention(self, request):
        return [[Scaled()]]


def test_bench_times_every_usable_backend_against_the_pytorch_form(registry, monkeypatch):
    from sftplug.linear_attention import choice

    survey = choice.survey
    monkeypatch.setattr("sftplug.diagnostics.linear_attention_bench.survey",
                        lambda hook, request: survey(hook, request) + survey(Offers(), request))
    rows = run_linear_attention_bench(registry, shapes=[(1, 70, 1, 2, 16)], device="cpu", repeats=1,
                                      packed_shape=(2, 80, 2, 2, 16, 8))
    json.dumps(rows)
    timed = {(r["backend"], r["case"]): r for r in rows if r["status"] == "ok"}
    assert set(timed) == {(name, case) for name in ("pytorch", "scaled")
                          for case in ("B1 T70 H1/2 D16", "packed B2 T80 H2/2 D16/8")}
    for (name, _), r in timed.items():
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and r["ktok_s"] > 0 and r["first_ms"] > 0
        if name == "pytorch":  # the reference itself
            assert r["out_err"] == r["grad_err"] == 0.0
        else:  # 1.5x the output and the gradients: half the largest value off, in fp32 rounding
            assert abs(r["out_err"] - 0.5) < 1e-5 and abs(r["grad_err"] - 0.5) < 1e-5
    # the others (the triton kernel off a GPU, plugins not installed): a row saying why not
    assert all(r["status"] == "ok" or r["status"].startswith("skipped: ") for r in rows)
    table = format_table(rows)
    assert "k tok/s" in table and "grad err" in table and "5.0e-01" in table and "not timed:" in table


def test_bench_respects_its_time_budget(registry):
    rows = run_linear_attention_bench(registry, shapes=[(1, 16, 1, 1, 16)], device="cpu", repeats=1, packed=False,
                                      budget_s=-1)
    assert rows and all(r["status"] != "ok" for r in rows)
    assert any("time budget" in r["status"] for r in rows)


def test_bench_linear_attention_command():
    result = invoke("bench", "linear-attention", "--json", "--device", "cpu", "--shape", "1,32,1,2,16", "--repeats",
                    "1", "--no-packed")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["case"] for r in rows if r["status"] == "ok"] == ["B1 T32 H1/2 D16"]
    table = invoke("bench", "linear-attention", "--device", "cpu", "--shape", "1x32x1x2x16x8", "--repeats", "1",
                   "--no-packed")
    assert table.exit_code == 0 and "B1 T32 H1/2 D16/8" in table.output, table.output
    bad = invoke("bench", "linear-attention", "--shape", "1,2,3")
    assert bad.exit_code == 2 and "--shape takes B,T,Hk,Hv,D" in bad.output
