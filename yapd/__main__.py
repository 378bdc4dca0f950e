from yapd.cli import main

# Guarded: vLLM's spawned EngineCore processes re-import __main__.
if __name__ == "__main__":
    raise SystemExit(main())
