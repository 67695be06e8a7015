"""Scale-out: Arrow/parquet input (`arrow`), the coarse quantizer for big IVF builds (`quantizer`), refinement
and sharded index builds in Spark (`spark`), and Milvus collections that record their refiner (`milvus`).
Each imports its engine (pyspark, pymilvus) only when used."""
