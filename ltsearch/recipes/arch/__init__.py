"""Architecture parts: the plain classifier, or BBN's bilateral branches (every module here is
imported)."""
from ltsearch.recipes.protocol import import_parts

import_parts(__name__, __path__)
