"""The vocabulary's split over tensor-parallel ranks (layers/vocab.py), rank by rank in one process."""

from __future__ import annotations

import pytest

from pagedllm.distributed import set_tensor_parallel_state
from pagedllm.layers.vocab import ParallelLMHead


@pytest.mark.parametrize("vocab,tp", [(50257, 2), (128256, 2), (151936, 4), (97, 4), (10, 4), (1000, 1)])
def test_slices_are_16_aligned_and_cover_the_vocabulary_once(vocab: int, tp: int) -> None:
    # 16-row slices start on whole Philox groups and 16-byte boundaries: sharded sampling's race
    # then serves every vocabulary (GPT-2's 50,257 split in two used to start rank 1 at 25,129).
    try:
        covered = []
        for rank in range(tp):
            set_tensor_parallel_state(rank, tp)
            head = ParallelLMHead(vocab, 8)
            if tp > 1:
                assert head.num_per_partition % 16 == 0
            assert head.vocab_start == rank * head.num_per_partition
            covered.extend(range(head.vocab_start, head.vocab_start + head.num_local_tokens))
        assert covered == list(range(vocab))
    finally:
        set_tensor_parallel_state(0, 1)
