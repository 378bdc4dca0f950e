from yapctl.gpubench.cli import main

raise SystemExit(main())
