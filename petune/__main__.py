from petune.cli import main

raise SystemExit(main())
