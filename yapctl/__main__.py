from yapctl.cli import main

raise SystemExit(main())
