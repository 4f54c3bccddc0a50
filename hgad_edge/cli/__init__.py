"""`hgad-edge` command line. Exists in every install; each verb imports its stack lazily and says
which extra to install when it is missing. Domain errors become ClickExceptions only here.

One module per group of verbs, each registered here by name: model (train, eval, demo), deploy
(export, quantize, triton-repo, build, check-trt), line (run, serve, calibrate), history (history), tools (info,
bench); common holds what they share. Importing the CLI and the --help of the group and of every verb import neither
torch nor the bench package, nor the training side: only `train --help` reads its head-mode registry
(hgad_edge.training.config, plain Python). tests/test_cli.py checks it.
"""

from __future__ import annotations

import click

from hgad_edge import __version__
from hgad_edge.cli.deploy import build, check_trt, export_cmd, quantize, triton_repo
from hgad_edge.cli.history import history_cmd
from hgad_edge.cli.line import calibrate_cmd, run, serve
from hgad_edge.cli.model import demo, eval_cmd, train
from hgad_edge.cli.tools import bench, info

__all__ = ["main"]


@click.group()
@click.version_option(__version__, prog_name="hgad-edge")
def main() -> None:
    """Unified visual anomaly detection (HGAD): train one model on many products, deploy it to the edge."""


main.add_command(train)
main.add_command(eval_cmd)
main.add_command(demo)
main.add_command(export_cmd)
main.add_command(quantize)
main.add_command(triton_repo)
main.add_command(build)
main.add_command(check_trt)
main.add_command(run)
main.add_command(serve)
main.add_command(calibrate_cmd)
main.add_command(history_cmd)
main.add_command(info)
main.add_command(bench)
