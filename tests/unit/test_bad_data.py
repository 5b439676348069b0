"""Bad and remote data: a truncated shard, an undecodable image, a missing shard, an HTTP 404 and
a server that drops the connection mid-shard are skipped, counted, and never stop the stream;
``data.strict`` fails instead. Remote shards come from a real HTTP server on 127.0.0.1."""

import functools
import socket
import http.server
import threading
from dataclasses import replace

import pytest

from sslscale.data.plan import Epochs
from sslscale.data.stream import DataStats, ImageDecoder, StreamReader, TrainStream, decode_or_skip
from sslscale.data.tar import sample_offsets

from .test_plan import write_shards

COUNTS = [6, 6, 6, 6]


def first_epoch(manifest):
    """Labels of the readable samples of epoch 0 (every stream read to the epoch cut), and the
    counters."""
    stats, labels = DataStats(strict=False), []
    cut = Epochs(tuple(s.num_samples for s in manifest.shards), 4, 0).cut(0)
    with pytest.warns(UserWarning, match="skipping"):
        for s in range(4):
            for sample, k in StreamReader(manifest, s, num_streams=4, seed=0, block=4, k=0, stats=stats):
                example = decode_or_skip(sample, ImageDecoder(2, 1), 0, stats)
                if example is not None:
                    labels.append(example["labels"])
                if k == cut:
                    break
    return sorted(labels), stats


def test_truncated_shard(tmp_path):
    manifest = write_shards(tmp_path, COUNTS)
    path = tmp_path / manifest.shards[1].name
    path.write_bytes(path.read_bytes()[: sample_offsets(path)[3] + 100])  # cut in sample 9
    labels, stats = first_epoch(manifest)
    # Sample 8 is whole, but nothing proves it (its sample could have had more members): dropped.
    assert labels == [i for i in range(24) if i not in (8, 9, 10, 11)]
    assert (stats.skipped_samples, stats.skipped_shards) == (4, 1)


def test_undecodable_image(tmp_path):
    manifest = write_shards(tmp_path, COUNTS)
    path = tmp_path / manifest.shards[2].name
    data = bytearray(path.read_bytes())
    at = data.index(b"\x89PNG", sample_offsets(path)[4])
    data[at:at + 8] = b"garbage!"  # sample 16's image no longer decodes
    path.write_bytes(bytes(data))
    labels, stats = first_epoch(manifest)
    assert labels == [i for i in range(24) if i != 16]
    assert (stats.skipped_samples, stats.skipped_shards) == (1, 0)


def test_missing_shard_and_strict(tmp_path):
    manifest = write_shards(tmp_path, COUNTS)
    (tmp_path / manifest.shards[0].name).unlink()
    labels, stats = first_epoch(manifest)
    assert labels == list(range(6, 24))
    assert (stats.skipped_samples, stats.skipped_shards) == (6, 1)
    strict = TrainStream(manifest, rank=0, world_size=1, num_workers=0, batch_size=4,
                         decode=ImageDecoder(2, 1), seed=0, shuffle_buffer=4, num_streams=4, strict=True)
    with pytest.raises(RuntimeError, match="data.strict=true.*shard-000000.tar"):
        next(iter(strict))


class DroppingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files; for shard-000003.tar sends the full Content-Length but the bytes only up to
    600 bytes into its fourth sample (past its first header)."""

    def log_message(self, *args):
        pass

    def copyfile(self, source, outputfile):
        if self.path.endswith("shard-000003.tar"):
            data = source.read()
            outputfile.write(data[: sample_offsets(source.name)[3] + 600])
            outputfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_WR)  # FIN after the bytes sent: short body
            return
        super().copyfile(source, outputfile)


@pytest.fixture
def http_root(tmp_path):
    handler = functools.partial(DroppingHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_shards_with_404_and_dropped_connection(http_root):
    root, base = http_root
    local = write_shards(root, COUNTS)
    (root / local.shards[1].name).unlink()  # -> HTTP 404
    remote = replace(local, shards=[replace(s, name=f"{base}/{s.name}") for s in local.shards])
    labels, stats = first_epoch(remote)
    # 404: shard 1 (samples 6-11) gives nothing; the drop cuts shard 3 inside sample 21: 18-20 live.
    assert labels == [*range(0, 6), *range(12, 21)]
    assert (stats.skipped_shards, stats.skipped_samples) == (2, 6 + 3), stats.__dict__


def test_pipe_shards_and_a_failing_command(tmp_path):
    local = write_shards(tmp_path, COUNTS)
    piped = replace(local, shards=[replace(s, name=f"pipe:cat {tmp_path / s.name}") for s in local.shards])
    piped.shards[2] = replace(piped.shards[2], name="pipe:cat /nonexistent/shard.tar")
    labels, stats = first_epoch(piped)
    assert labels == [i for i in range(24) if not 12 <= i < 18]
    assert (stats.skipped_shards, stats.skipped_samples) == (1, 6)
