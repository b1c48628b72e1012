"""Input pipeline images/s per core (ours vs today's vs I-JEPA's), the loader by workers, the engine's data wait."""
from iwm_fast.bench.data import main

if __name__ == "__main__":
    main()
