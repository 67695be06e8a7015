"""Train from a store you already have: read its vectors and document ids, and turn (query, document id)
pairs into an `EmbeddingData` whose qrels are the store's rows.

    from simskip_faiss.integrations import stores

    corpus = stores.langchain_corpus(store)      # or chroma_corpus(collection), llama_index_corpus(index)
    data = corpus.training_data([("a kitten on a rug", "doc-7"), ...])  # (query text or vector, document id)
    sf.fit(data, sf.TrainConfig(metric=corpus.metric)).export("refiner.onnx")  # + its document updates
    refiner = stores.apply_updates(store, "refiner.onnx", corpus)  # moves the found documents' vectors

Each reader returns a `StoreCorpus`: the vectors the store holds (float32, read back, never re-embedded:
LlamaIndex embedded each node with its metadata, `MetadataMode.EMBED`, and those are the vectors
returned), the framework's own document id of each row (LangChain docstore ids, Chroma ids, LlamaIndex
node ids or ref_doc ids), a function embedding query texts the way the store's model embeds a query at
search time (what a refiner receives), and the metric the store ranks by. A reader only reads. Each
framework is imported inside its reader, so this module imports without them.

Pairs alone train a query-only refiner (`apply_to="queries"`): the store's vectors stay valid and only its
query embedding is wrapped. A refiner that also refines documents needs the store rebuilt through the
wrapper. Pairs also give document updates (the vectors of documents the training queries found, moved,
keyed by corpus row); the wrappers cannot apply them (they see texts, not ids), so `apply_updates` writes
them into the store the corpus was read from, in place, and returns the refiner without them to wrap it with.
A store that already embeds through a refiner is refused: read the store built with your base model.
"""
from .store_corpus import (StoreCorpus, chroma_copy, chroma_corpus, langchain_corpus, llama_index_corpus,
                           training_data)
from .store_updates import UPDATES_KEY, apply_updates

__all__ = ["StoreCorpus", "langchain_corpus", "chroma_corpus", "chroma_copy", "llama_index_corpus", "training_data",
           "apply_updates", "UPDATES_KEY"]
