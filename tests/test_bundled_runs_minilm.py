"""The bundled recipes on the packaged minilm-l6, each a short run end to end (a module of its own,
so parallel workers run them beside the other packaged model's)."""

from __future__ import annotations

import pytest
from test_bundled_recipes import SMOKE_TIMEOUT, recipes_on, run_end_to_end

pytestmark = pytest.mark.timeout(SMOKE_TIMEOUT + 60)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipes_on("minilm-l6"), ids=lambda r: r.stem)
def test_bundled_recipe_runs_end_to_end(recipe, tmp_path):
    run_end_to_end(recipe, tmp_path)
