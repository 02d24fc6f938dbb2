"""The other half of test_bundled_runs_gemma.py's real-model runs (see there why they are split)."""

from __future__ import annotations

import pytest
from test_bundled_recipes import SMOKE_TIMEOUT, recipes_on, run_end_to_end

pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipes_on("gemma-3-270m")[1::2], ids=lambda r: r.stem)
def test_bundled_recipe_runs_end_to_end(recipe, tmp_path):
    run_end_to_end(recipe, tmp_path)
