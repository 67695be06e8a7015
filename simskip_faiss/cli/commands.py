"""Compatibility: the CLI was split into main (parser, dispatch, error reports), common, train, serve, evaluate
and scale. These names keep importing from here for one release, with a DeprecationWarning; import them from
those modules."""
import warnings

from .common import CLIError, check_output
from .evaluate import cmd_eval, cmd_run
from .main import _is_user_error, build_parser, main, plain_message
from .scale import cmd_milvus_ingest, cmd_milvus_search, cmd_spark_build, cmd_spark_refine
from .serve import cmd_build, cmd_info, cmd_search
from .train import cmd_quantize, cmd_train

__all__ = ["CLIError", "build_parser", "check_output", "cmd_build", "cmd_eval", "cmd_info", "cmd_milvus_ingest",
           "cmd_milvus_search", "cmd_quantize", "cmd_run", "cmd_search", "cmd_spark_build", "cmd_spark_refine",
           "cmd_train", "main", "plain_message", "_is_user_error"]

warnings.warn("simskip_faiss.cli.commands was split into simskip_faiss.cli.main, common, train, serve, evaluate and "
              "scale; the old path will be removed in the next release", DeprecationWarning, stacklevel=2)
