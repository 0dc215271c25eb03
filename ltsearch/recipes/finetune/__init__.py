"""Fine-tuning parts, one module each (every module here is imported): which parameters of a
(pretrained) backbone stage 1 trains, and the modules some of them add (adapters, LoRA, prompts)."""
from ltsearch.recipes.protocol import import_parts

import_parts(__name__, __path__)
