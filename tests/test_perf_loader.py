"""`python -m bench.perf loader`: Pillow and torchvision interleaved, the speed-up paired per round."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.perf import loader


def test_rounds_interleave_the_decoders_and_pair_the_ratio(monkeypatch):
    calls = []
    rates = {"pil": iter([100.0, 50.0, 80.0]), "torchvision": iter([300.0, 100.0, 400.0])}

    def fake(root, processes, batch_size, batches, decoder, decode_on, device):
        calls.append((decoder, decode_on))
        return {"images_per_s": next(rates[decoder]), "images": batches * batch_size}

    monkeypatch.setattr(loader, "time_loader", fake)
    row = loader.compare(Path("."), 2, 4, 3, rounds=3, decode_on="device", device="cpu")
    # pil first in even rounds, torchvision first in odd ones; Pillow always decodes in the loader
    assert calls == [("pil", "loader"), ("torchvision", "device"), ("torchvision", "device"), ("pil", "loader"),
                     ("pil", "loader"), ("torchvision", "device")]
    assert row["by_decoder"]["pil"]["images_per_s"] == [100.0, 50.0, 80.0]
    assert row["speedup_median"] == 3.0 and row["speedup_min"] == 2.0 and row["speedup_max"] == 5.0
    assert row["images"] == 12 and row["images_per_s"] == 300.0 and row["per_process"] == 150.0


@pytest.mark.slow
def test_decode_on_device_runs_on_the_cpu(tmp_path: Path, capsys):
    code = loader.main(["--generate", "8", "--processes", "1", "--batch-size", "2", "--batches", "2",
                        "--rounds", "1", "--decode-on", "device"])
    out = capsys.readouterr().out
    assert code == 0 and "speed-up torchvision/pil: median" in out and "torchvision decodes on device" in out


def test_cuda_without_a_gpu_is_refused(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit):
        loader.parse_args(["--device", "cuda"])
    assert "torch sees no CUDA device" in capsys.readouterr().err
