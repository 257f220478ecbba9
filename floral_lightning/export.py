"""Export a trained run's models from a Lightning checkpoint.

    python -m floral_lightning.export CKPT --client 3 --out client3.pt   # client 3's personalised network
    python -m floral_lightning.export CKPT --folder floral_model/         # the whole federated model

``--client`` writes ``client3.pt`` (``torch.save`` of the module: ``torch.load(path, weights_only=False)``)
and ``client3.state_dict.pt`` beside it. ``--folder`` writes ``config.json`` and ``model.safetensors``, which
``floral_lightning.pretrained.load_pretrained(folder)`` reads back without Lightning. The checkpoint is
loaded with ``FloralModule.load_from_checkpoint(CKPT)`` (its method class is recorded in it), so it must
come from a CLI run or from a module whose ``base`` was given as a spec.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .module import FloralModule
from .pretrained import save_client_model


def export(checkpoint: str | Path, client: int | None = None, out: str | Path | None = None,
           folder: str | Path | None = None) -> list[Path]:  # fmt: skip
    """Export client ``client``'s network to ``out`` and/or the whole model to ``folder``; the paths written."""
    if (client is None) != (out is None):
        raise ValueError(f"client={client} and out={out}: give both (one client's network) or neither")
    if client is None and folder is None:
        raise ValueError("nothing to export: give client and out, or folder")
    module = FloralModule.load_from_checkpoint(checkpoint, map_location="cpu")
    written: list[Path] = []
    if client is not None:
        written.extend(save_client_model(module.client_model(client), out))
    if folder is not None:
        written.append(module.save_pretrained(folder))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m floral_lightning.export", description=__doc__.split("\n\n")[0].strip()
    )
    parser.add_argument("checkpoint", help="a checkpoint of a FloralModule run (e.g. checkpoints/last.ckpt)")
    parser.add_argument("--client", type=int, help="the client whose personalised network to export")
    parser.add_argument("--out", help="with --client: the .pt file of the network (its state_dict goes beside)")
    parser.add_argument("--folder", help="write the whole federated model to this folder (safetensors + JSON)")
    args = parser.parse_args(argv)
    if args.client is None and args.folder is None:
        parser.error("give --client K --out FILE, or --folder DIR, or both")
    if (args.client is None) != (args.out is None):
        parser.error("--client and --out go together")
    for path in export(args.checkpoint, args.client, args.out, args.folder):
        print(path)


if __name__ == "__main__":
    main()
