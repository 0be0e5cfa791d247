"""Which images each rank takes, batch by batch, and which of them are flipped: drawn from the seed
and the data position alone, so every loader (in-memory, folder, prepared) gives the same batches on
any number of ranks and after a resume."""
import torch


class ShardedBatches:
    """Batch `index` of `epoch`: a seeded permutation per epoch, cut into global batches, each
    rank taking every world_size-th index of its batch; the last incomplete batch is dropped.
    micro > 1 (gradient accumulation): the rank's batch is `micro` micro-batches one after another,
    micro-batch i holding what rank rank * micro + i of a world_size * micro-rank run takes."""

    def __init__(self, n, batch_per_rank, rank, world_size, seed, micro=1):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch_per_rank, rank, world_size, seed
        self.micro = micro
        self.per_epoch = n // (batch_per_rank * world_size)
        self._perm = (None, None)
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one global batch "
                             f"({batch_per_rank} per rank x {world_size} ranks); lower train.batch_size")

    def indices(self, epoch, index):
        if self._perm[0] != epoch:           # one permutation per epoch: ImageNet's takes 91 ms to draw (2 cores)
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        perm = self._perm[1]
        start = index * self.batch * self.world
        return self.mine(perm[start:start + self.batch * self.world])

    def mine(self, rows):
        """This rank's rows of a global batch's: virtual rank v of world * micro takes rows v, v + world *
        micro, ...; this rank's micro-batches are virtual ranks rank * micro ... rank * micro + micro - 1."""
        return rows.view(-1, self.world, self.micro)[:, self.rank].T.flatten()

    def next_pos(self, epoch, index):
        return (epoch + 1, 0) if index + 1 == self.per_epoch else (epoch, index + 1)

    def stream(self, epoch, index):
        while True:
            yield self.indices(epoch, index).tolist()
            epoch, index = self.next_pos(epoch, index)


def mirror_mask(batches, epoch, index):
    """Which images of this rank's batch at (epoch, index) are flipped left-right (probability 1/2):
    seeded by the data position and drawn for the global batch (each rank takes its rows), so the
    flips are the same after a resume, on any number of ranks, whichever loader reads the data."""
    g = torch.Generator().manual_seed(batches.seed * 7919 + epoch * 100003 + index)
    return batches.mine(torch.rand(batches.batch * batches.world, generator=g) < 0.5)


def mirror(x, batches, epoch, index):
    flip = mirror_mask(batches, epoch, index).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
