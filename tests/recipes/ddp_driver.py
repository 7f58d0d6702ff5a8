"""Run a recipe in-process under `torchrun`, then save this rank's trained weights as `<output_dir>/rank<R>.safetensors`.

Usage: torchrun --nproc_per_node 2 ddp_driver.py recipes/<script>.py <recipe arguments...>
"""

import importlib.util
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

script, argv = Path(sys.argv[1]).resolve(), sys.argv[2:]
sys.path.insert(0, str(script.parent))
spec = importlib.util.spec_from_file_location(script.stem, script)
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
args = recipe.parse_args(argv)
model = recipe.training_function(args)
state = {name: tensor.detach().cpu().clone().contiguous() for name, tensor in model.state_dict().items()}
save_file(state, os.path.join(args.output_dir, f"rank{os.environ.get('RANK', '0')}.safetensors"))
