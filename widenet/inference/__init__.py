"""Using trained models: loading any saved model, predicting on files and text."""

from .loading import Pretrained, from_pretrained, load_pretrained, save_pretrained
from .predict import (Answer, ClassScore, ImageFailure, ImagePrediction, PredictError, TextPrediction, find_images,
                      predict_images)
from .predict_text import answer_questions, classify_texts, read_sentences

__all__ = ["Answer", "ClassScore", "ImageFailure", "ImagePrediction", "PredictError", "Pretrained",
           "TextPrediction", "answer_questions", "classify_texts", "find_images", "from_pretrained",
           "load_pretrained", "predict_images", "read_sentences", "save_pretrained"]
