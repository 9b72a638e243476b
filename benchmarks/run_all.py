"""Run every benchmark script in this folder (`make bench`)."""

import pathlib
import runpy
import sys


here = pathlib.Path(__file__).parent
sys.path.insert(0, str(here))
selected = sys.argv[1:]
for script in sorted(here.glob("*.py")):
    if script.name.startswith("_") or script.name == "run_all.py":
        continue
    if selected and script.stem not in selected:
        continue
    print(f"\n# {script.stem}", flush=True)
    runpy.run_path(str(script), run_name="__main__")
