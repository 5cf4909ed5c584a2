"""One process replaying a file dataset's order as docs/data.md documents it (the reference of
the file-dataset tests)."""

from shardps.worker.filedata import FileBatchStream
from shardps.worker.fileorder import assign_files


def rank_batches(data, rank, world, global_batch, seed, epochs, shuffle=False):
    """Rank's batches for `epochs` epochs straight from FileBatchStream: every epoch is
    L = ceil(rows / B) steps; a rank's R rows of it come in batches of ceil(R / L), then empty
    steps (None) to the epoch's end."""
    steps = -(-data.num_train // global_batch)
    out = []
    for epoch in range(epochs):
        mine = assign_files(data.train_files, range(world), epoch, seed)[rank]
        rows = sum(data.rows[f] for f in mine)
        got = []
        if rows:
            with FileBatchStream(mine, -(-rows // steps), epoch=epoch, seed=seed,
                                 shuffle=shuffle) as stream:
                got = list(stream)
        assert len(got) <= steps
        out += got + [None] * (steps - len(got))
    return out
