"""``from trainer.integrations.sampler import IndexedDataset, with_indices``: what your own ``DataLoader`` needs
to train on the adopted subset (``AdaptiveSubset.batch_sampler()`` gives the sampler). The code is in
``trainer.client.sampler`` and ``trainer.client.batches``.
"""

from trainer.client.batches import IndexedCollate, IndexedDataset, with_indices
from trainer.client.sampler import SubsetBatchSampler

__all__ = ["IndexedCollate", "IndexedDataset", "SubsetBatchSampler", "with_indices"]
