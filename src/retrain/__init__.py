"""retrain: retrain an image classifier for new categories by transfer learning.

    >>> import retrain
    >>> result = retrain.train("flower_photos")          # folder of class sub-folders
    >>> result.test_accuracy, result.output_graph
    >>> retrain.load(result.output_graph).classify("rose.jpg")[0]
"""

__version__ = "0.1.0"

from retrain.config import TrainConfig as TrainConfig  # noqa: E402
from retrain.errors import RetrainError as RetrainError  # noqa: E402
from retrain.predict import Classifier as Classifier  # noqa: E402
from retrain.predict import Prediction as Prediction
from retrain.predict import load as load
from retrain.train import TrainResult as TrainResult  # noqa: E402
from retrain.train import train as train

__all__ = ["Classifier", "Prediction", "RetrainError", "TrainConfig", "TrainResult", "load", "train", "__version__"]
