"""Great Expectations for the validate stage: one ephemeral context per run that validates each
:class:`~skinlesion.checks.suites.Check` as one suite, turns its failing expectations into
:class:`~skinlesion.checks.suites.Failure` records and renders everything as Data Docs (HTML).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from skinlesion.checks.suites import Check, Failure, Spec

MAX_EXAMPLES = 3  # failing rows/files named per expectation in the summary


class GxRunner:
    """One ephemeral GX context for the whole run: importing GX and building contexts is slow."""

    def __init__(self) -> None:
        # Set here, not at import: GX reads it when imported and otherwise phones home.
        os.environ["GX_ANALYTICS_ENABLED"] = "false"
        gx_log = logging.getLogger("great_expectations")
        if gx_log.level == logging.NOTSET:  # its INFO chatter at import would bury our summary
            gx_log.setLevel(logging.WARNING)
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import ProgressBarsConfig

        # This module forces its own logger to INFO ("Created temporary directory ..." per context).
        logging.getLogger("great_expectations.data_context.types.base").setLevel(gx_log.level)

        self.gx, self.gxe = gx, gxe
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        # The default site would write into a fresh /tmp folder; ours is added at build time.
        self.context.delete_data_docs_site("local_site")
        self.source = self.context.data_sources.add_pandas("frames")

    def validate(self, check: Check) -> list[Failure]:
        """Run ``check`` as one GX validation; return its failing expectations."""
        gx, gxe = self.gx, self.gxe
        suite = self.context.suites.add(gx.ExpectationSuite(name=check.name))
        for spec in check.specs:
            suite.add_expectation(
                getattr(gxe, spec.kind)(
                    **spec.kwargs,
                    notes=spec.message,
                    meta={"key": spec.key},
                    severity="critical" if spec.gating else "warning",
                )
            )
        batch = self.source.add_dataframe_asset(check.name).add_batch_definition_whole_dataframe("all")
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=check.name, data=batch, suite=suite)
        )
        with warnings.catch_warnings():
            # pandas warns when a regex (a user's image_id_pattern) has capture groups: harmless here.
            warnings.filterwarnings("ignore", message="This pattern is interpreted as a regular expression")
            result = vd.run(
                batch_parameters={"dataframe": check.frame}, result_format={"result_format": "COMPLETE"}
            )
        by_key = {spec.key: spec for spec in check.specs}
        failures = []
        for r in result.results:
            if r.success:
                continue
            spec = by_key[r.expectation_config.meta["key"]]
            failures.append(_failure(check, spec, r.result or {}, r.exception_info or {}))
        order = list(by_key)
        return sorted(failures, key=lambda f: order.index(f.key))

    def build_docs(self, site_dir: Path) -> Path:
        """Render every suite and validation result of this run as Data Docs into ``site_dir``."""
        self.context.add_data_docs_site(
            "validation",
            {
                "class_name": "SiteBuilder",
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(site_dir.resolve()),  # GX refuses relative paths here
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        self.context.build_data_docs(site_names=["validation"])
        return site_dir / "index.html"


def _failure(check: Check, spec: Spec, result: dict[str, Any], exc: dict[str, Any]) -> Failure:
    name = check.frame.index.name
    if exc.get("raised_exception"):  # a bug in a check, never a pass
        msg = (exc.get("exception_message") or "").strip().splitlines()
        return Failure(
            check.suite,
            check.name,
            spec.key,
            spec.message,
            check.unit,
            1,
            (),
            (f"GX raised: {msg[-1] if msg else '?'}",),
            spec.gating,
        )
    if "unexpected_index_list" not in result:  # a table-level expectation
        return Failure(
            check.suite,
            check.name,
            spec.key,
            spec.message,
            "column",
            max(spec.table_count, 1),
            (),
            (spec.note,) if spec.note else (),
            spec.gating,
        )
    index = tuple(v[name] if isinstance(v, dict) else v for v in result["unexpected_index_list"])
    examples = []
    for idx in index[:MAX_EXAMPLES]:
        row = check.frame.loc[idx]
        text = " ".join(t for t in (check.item(idx, row), spec.detail(row) if spec.detail else "") if t)
        examples.append(text)
    count = int(result.get("unexpected_count", len(index)))
    return Failure(
        check.suite,
        check.name,
        spec.key,
        spec.message,
        check.unit,
        count,
        index,
        tuple(examples),
        spec.gating,
    )
