"""The optional `fla` plugin: where flash-linear-attention cannot run it says why (in `sftplug plugins`,
`sftplug doctor` and a run asking for it), and its mapping of sftplug's call onto fla's
chunk_gated_delta_rule (cu_seqlens from doc_ids, the scale, the [B, T, H, D] layout, grouped value
heads) gives sftplug's PyTorch form, run through a fake fla that follows fla's documented contract."""

import re

import pytest
import torch
from click.testing import CliRunner

from sftplug.cli import cli
from sftplug.diagnostics.doctor import doctor_report, format_doctor
from sftplug.errors import SftplugError
from sftplug.linear_attention.backend import LinearAttentionRequest
from sftplug.linear_attention.choice import choose_linear_attention, linear_attention_skipped
from sftplug.linear_attention.pytorch import gated_delta_rule, recurrent_reference
from sftplug.plugins import fla_linear_attention as plugin

NOT_INSTALLED = "flash-linear-attention is not installed: pip install 'sftplug[fla]'"


def request(name="auto", device="cuda"):
    return LinearAttentionRequest(name, torch.device(device), torch.bfloat16, 16, 32, 128, 128, packed=True)


def fake_fla(q, k, v, g, beta, scale=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """fla's chunk_gated_delta_rule as its docstring states it, computed token by token: [B, T, H, D] inputs of
    one dtype, value head i reading q/k head i // (HV / H), o = S^T q · scale, the state restarting at each
    sequence of cu_seqlens (then the batch is one row)."""
    assert q.dtype == k.dtype == v.dtype and not output_final_state
    q, k = (x.repeat_interleave(v.shape[2] // q.shape[2], dim=2) for x in (q, k))
    q = q * (scale * q.shape[-1] ** 0.5)  # the reference scales by Dk^-1/2 itself
    if cu_seqlens is None:
        spans = [(row, 0, q.shape[1]) for row in range(q.shape[0])]
    else:
        assert q.shape[0] == 1 and cu_seqlens.dtype == cu_seqlens_cpu.dtype == torch.long
        assert torch.equal(cu_seqlens.cpu(), cu_seqlens_cpu) and cu_seqlens_cpu[0] == 0
        assert cu_seqlens_cpu[-1] == q.shape[1]
        spans = [(0, int(s), int(e)) for s, e in zip(cu_seqlens_cpu[:-1], cu_seqlens_cpu[1:])]
    parts = [recurrent_reference(*(x[row:row + 1, s:e] for x in (q, k, v, g, beta))) for row, s, e in spans]
    o = torch.cat(parts, dim=0 if cu_seqlens is None else 1)
    return o.to(v.dtype), None


def whole_rows(q, k, v, g, beta, scale=None, output_final_state=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """A wrong fla: it ignores the documents."""
    return fake_fla(q, k, v, g, beta, scale)


def inputs(rows=2, length=70, hk=2, hv=4, dk=8, dv=6):
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.nn.functional.normalize(torch.randn(rows, length, hk, dk, generator=gen), dim=-1) for _ in range(2))
    v = torch.randn(rows, length, hv, dv, generator=gen)
    g, beta = -torch.rand(rows, length, hv, generator=gen), torch.rand(rows, length, hv, generator=gen)
    return [x.double().requires_grad_() for x in (q, k, v, g, beta)]


def doc_ids_of(*rows):
    """Rows of documents of these lengths, each row's ids from the previous row's last: a row's start is a
    document's start though its id goes on."""
    ids, first = [], 0
    for row in rows:
        ids.append(torch.cat([torch.full((n,), first + i, dtype=torch.int32) for i, n in enumerate(row)]))
        first += len(row) - 1
    return torch.stack(ids)


def test_its_check_says_how_to_install_it_and_that_it_needs_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(plugin, "installed_version", lambda: None)
    assert plugin.FlaPlugin().why_unavailable() == NOT_INSTALLED
    assert plugin.FlaChunked().check(request()) == NOT_INSTALLED
    monkeypatch.setattr(plugin, "installed_version", lambda: "0.6.0")
    monkeypatch.setattr(plugin.probes, "cuda_available", lambda: False)
    assert plugin.FlaPlugin().why_unavailable().startswith("flash-linear-attention needs a CUDA GPU: ")
    assert plugin.FlaChunked().check(request(device="cpu")) == "flash-linear-attention needs a CUDA GPU, not cpu"
    monkeypatch.setattr(plugin, "installed_version", lambda: "0.4.2")
    assert plugin.FlaChunked().check(request()) == ("flash-linear-attention 0.4.2 has no grouped value heads (0.5 or "
                                                    "later does): pip install 'sftplug[fla]'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="where a GPU is there fla may run")
def test_plugins_doctor_and_a_run_asking_for_it_say_why_it_is_unavailable(registry):
    why = plugin.FlaPlugin().why_unavailable()
    listed = CliRunner().invoke(cli, ["plugins"], env={"SFTPLUG_NO_ENTRYPOINTS": "1"})
    assert listed.exit_code == 0, listed.output
    line = next(i for i, text in enumerate(listed.output.splitlines()) if text.startswith("fla "))
    assert "unavailable" in listed.output.splitlines()[line]
    assert listed.output.splitlines()[line + 1].strip() == f"reason: {why}"
    text = format_doctor(doctor_report(registry, "cpu"))
    assert f"fla      unavailable: {why}" in text.split("linear attention on cpu")[1]
    with pytest.raises(SftplugError, match=f"^--linear-attention fla is unavailable: {re.escape(why)}; usable here: "
                                           "pytorch$"):
        choose_linear_attention(registry.hook, request("fla", "cpu"), linear_attention_skipped(registry))


def test_cu_seqlens_start_each_document_and_each_row():
    cu_seqlens, on_host = plugin.cu_seqlens_of(doc_ids_of([1, 20, 49], [40, 1, 29]))
    assert on_host.tolist() == [0, 1, 21, 70, 110, 111, 140] and torch.equal(cu_seqlens, on_host)
    backend, doc_ids = plugin.FlaChunked(), doc_ids_of([3, 4])
    assert backend.boundaries(doc_ids) is backend.boundaries(doc_ids)  # read once for a forward's layers
    assert backend.boundaries(doc_ids.clone())[1].tolist() == [0, 3, 7]


@pytest.mark.parametrize("packed", [True, False])
def test_the_mapping_gives_the_pytorch_form(packed):
    """Packed: a one-token document, documents across the 64-token chunk boundary, a second row with others;
    GQA heads (2 q/k heads, 4 value heads). Output and every input's gradient; the fake runs in fp64, the
    PyTorch form in fp32 (its chunks computed in fp32 whatever the inputs): fp32's tolerance, where a wrong
    mapping is O(1) off."""
    doc_ids = doc_ids_of([1, 20, 49], [40, 1, 29]) if packed else None
    x = inputs()
    grad = torch.randn(2, 70, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    boundaries = plugin.cu_seqlens_of(doc_ids) if packed else None
    got = plugin.fla_gated_delta_rule(fake_fla, *x, boundaries)
    want = gated_delta_rule(*x, doc_ids)
    got, want = ([out.detach(), *torch.autograd.grad(out, x, grad)] for out in (got, want))
    for a, b in zip(got, want):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_its_first_run_compares_with_the_pytorch_form():
    assert plugin.first_run("cpu", torch.float32, 16, 16, kernel=fake_fla) is None
    wrong = plugin.first_run("cpu", torch.float32, 16, 16, kernel=whole_rows)
    assert wrong.startswith("flash-linear-attention's first run for fp32, head dims 16/16 on cpu is wrong: output "
                            "off by")
