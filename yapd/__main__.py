from yapd.cli import main

raise SystemExit(main())
