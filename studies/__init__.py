"""The seeds' experiments as one command each: `beton-studies <name> [--scale smoke|medium|full]`.

A study is a table of ordinary train.py runs (label -> recipe + `--set` overrides, see `catalog`), run as
subprocesses into `<out>/<study>/runs/<label>`, then one report (`report.md`: table + PNG plots) built from
those run folders. Probe studies (filters, stride/padding, loss landscape) add measurements on a trained run.
"""

__all__: list[str] = []
