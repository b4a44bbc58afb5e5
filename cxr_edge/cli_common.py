"""What the ``cxr-edge`` commands (cxr_edge/cli.py, cli_classify.py, cli_services.py) share: their usage errors
(exit status 2), the ``--model`` and ``--allow-adults`` options, and loading the classifier."""
from __future__ import annotations

import click

from cxr_edge.bundle import BundleError
from cxr_edge.engines import EngineError
from cxr_edge.options import ClassifierOptions


class ModelLoadError(click.ClickException):
    """The model bundle cannot be loaded: a usage problem (exit status 2), shown without the usage text."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(f"cannot load the model: {message}")



class UsageFailure(click.ClickException):
    """A usage problem (exit status 2), shown without the usage text."""

    exit_code = 2


def load_classifier(options: ClassifierOptions):
    """``options.classifier()``, or :class:`ModelLoadError` when the bundle cannot be loaded."""
    try:
        return options.classifier()
    except (BundleError, EngineError) as exc:
        raise ModelLoadError(str(exc)) from None


allow_adults_option = click.option(
    "--allow-adults", "allow_adults", is_flag=True,
    help="Classify adult chest X-rays (DICOM PatientAge >= 18 years, or the input gate's adult check) instead of "
         "refusing them; their records carry a 'warning' (the model was trained on children aged 1 to 5).")
model_option = click.option("--model", "model", metavar="BUNDLE", default=None,
                            help="Model bundle folder or its card.json (default: the bundled model).")
