import torch

from sftplug.kernels.packed_documents import PackPlan, bucket_length, document_lengths, one_document_per_row


def test_bucket_lengths_pad_by_at_most_a_quarter():
    for n in range(1, 3000):
        L = bucket_length(n, 4096)
        assert n <= L <= max(n * 1.25, n + 7)
    assert bucket_length(2048, 2048) == 2048
    assert bucket_length(100, 100) == 100  # never longer than the row


def test_documents_of_a_row():
    doc_ids = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0]])
    assert document_lengths(doc_ids) == [[3, 1, 2], [6]]
    assert not one_document_per_row(doc_ids) and one_document_per_row(doc_ids[1:])


def test_the_plan_gathers_each_document_into_its_bucket_and_back():
    doc_ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1]])
    plan = PackPlan(doc_ids, causal=False)  # exact lengths: one bucket per distinct length
    assert sorted((L, n) for L, n, _ in plan.buckets) == [(1, 2), (3, 1), (4, 1), (7, 1)]
    flat = torch.arange(16)
    gathered = torch.cat([flat[index] for _, _, index in plan.buckets])
    assert torch.equal(gathered[plan.take], flat)  # every position comes back to where it was
