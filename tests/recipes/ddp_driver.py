"""Run a recipe in-process under `torchrun`, then save this rank's trained weights as `<output_dir>/rank<R>.safetensors`.

Usage:
    torchrun --nproc_per_node 2 ddp_driver.py recipes/<script>.py <recipe arguments...>
    torchrun --nproc_per_node 2 ddp_driver.py recipes/<script>.py --each_method '{"lara": ["num_landmarks=4"]}' \
        <recipe arguments without --method/--output_dir...> --output_dir OUT

With `--each_method`, the recipe runs once per method in the same process group, into `OUT/<method>`.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file


def run(recipe, argv: list[str]) -> None:
    args = recipe.parse_args(argv)
    model = recipe.training_function(args)
    state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, os.path.join(args.output_dir, f"rank{os.environ.get('RANK', '0')}.safetensors"))


script, argv = Path(sys.argv[1]).resolve(), sys.argv[2:]
sys.path.insert(0, str(script.parent))
spec = importlib.util.spec_from_file_location(script.stem, script)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
if argv[:1] == ["--each_method"]:
    methods, argv = json.loads(argv[1]), argv[2:]
    out = argv[argv.index("--output_dir") + 1]
    argv = argv[: argv.index("--output_dir")] + argv[argv.index("--output_dir") + 2 :]
    for method, hparams in methods.items():
        extra = [a for item in hparams for a in ("--hparam", item)]
        run(recipe, [*argv, "--method", method, *extra, "--output_dir", os.path.join(out, method)])
        print(f"method {method}: done", flush=True)
else:
    run(recipe, argv)
