"""Loss parts, one module each: every module in this folder is imported, so adding a loss is
adding one file that registers it with ``@LOSSES.register``."""
from ltsearch.recipes.protocol import import_parts

import_parts(__name__, __path__)
