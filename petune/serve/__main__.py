from petune.serve import main

raise SystemExit(main())
