"""The testbed: a Transformer whose blocks are the schemes executed with torch modules, and the
corpora it reads."""

from analysis.testbed.corpus import Corpus, load_corpus
from analysis.testbed.model import ModelConfig, Testbed, build_model

__all__ = ["Corpus", "ModelConfig", "Testbed", "build_model", "load_corpus"]
