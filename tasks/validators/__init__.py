"""The validators: contract, citations, support, policy and abstention, each versioned, each
returning reasons (a code and a message fit to go back to the model in a repair round).

Pure code: no Celery, no store. The stage entry point is `tasks.validation.validate`.
"""

from tasks.validators.contract import (
    Contract,
    ContractRegistry,
    GroundedAnswer,
    as_text,
    json_object,
    markdown_sections,
)
from tasks.validators.rules import ValidatorRules
from tasks.validators.suite import ValidatorSuite, suite_versions
from tasks.validators.support import CalibrationError, SupportCalibration, SupportScorer

__all__ = ["CalibrationError", "Contract", "ContractRegistry", "GroundedAnswer", "SupportCalibration",
           "SupportScorer", "ValidatorRules", "ValidatorSuite", "as_text", "json_object",
           "markdown_sections", "suite_versions"]
