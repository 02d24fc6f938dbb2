"""The bundled recipes on the packaged gemma-3-270m, each a short run end to end: every other one
(sorted by name) here, the rest in test_bundled_runs_gemma_2.py, so that parallel workers (which
take a module each) share the real-model runs, the suite's longest tests."""

from __future__ import annotations

import pytest
from test_bundled_recipes import SMOKE_TIMEOUT, recipes_on, run_end_to_end

pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipes_on("gemma-3-270m")[0::2], ids=lambda r: r.stem)
def test_bundled_recipe_runs_end_to_end(recipe, tmp_path):
    run_end_to_end(recipe, tmp_path)
