"""retrain: retrain an image classifier for new categories by transfer learning.

    >>> import retrain
    >>> result = retrain.train("flower_photos")          # folder of class sub-folders
    >>> result.test_accuracy, result.output_graph
    >>> retrain.load(result.output_graph).classify("rose.jpg")[0]

The steps of ``train`` one by one (see the README's Python section)::

    dataset = retrain.discover("flower_photos")
    features = retrain.extract_features(dataset)
    splits = retrain.split_features(dataset, features)
    head = retrain.SoftmaxHead(steps=500).fit(splits.train.X, splits.train.y, n_classes=len(splits.labels))
    retrain.export_model(head, splits.labels, "model.onnx")
"""

__version__ = "0.1.0"

from retrain.config import TrainConfig as TrainConfig  # noqa: E402
from retrain.data import discover as discover  # noqa: E402
from retrain.errors import RetrainError as RetrainError  # noqa: E402
from retrain.features import extract_features as extract_features  # noqa: E402
from retrain.head import SoftmaxHead as SoftmaxHead  # noqa: E402
from retrain.predict import Classifier as Classifier  # noqa: E402
from retrain.predict import Prediction as Prediction
from retrain.predict import load as load
from retrain.splits import Split as Split  # noqa: E402
from retrain.splits import Splits as Splits
from retrain.splits import split_features as split_features
from retrain.train import TrainResult as TrainResult  # noqa: E402
from retrain.train import train as train


def __getattr__(name: str):
    # Fine-tuning needs PyTorch: imported on first use, so `import retrain` stays light.
    if name in ("fine_tune", "FineTuned"):
        from retrain import finetune

        return getattr(finetune, name)
    # Writing a model needs the onnx package (~0.7 s to import): loaded on first use, so that reading one
    # (label_image, retrain.load, the server) never pays for it.
    if name == "export_model":
        from retrain.export import export_model

        return export_model
    raise AttributeError(f"module 'retrain' has no attribute {name!r}")


__all__ = [
    "Classifier",
    "FineTuned",
    "Prediction",
    "RetrainError",
    "SoftmaxHead",
    "Split",
    "Splits",
    "TrainConfig",
    "TrainResult",
    "discover",
    "export_model",
    "extract_features",
    "fine_tune",
    "load",
    "split_features",
    "train",
    "__version__",
]
