"""Second-stage parts on frozen features, one module each (every module here is imported)."""
from ltsearch.recipes.protocol import import_parts

import_parts(__name__, __path__)
