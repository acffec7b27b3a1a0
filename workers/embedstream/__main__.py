from embedstream.cli import main

raise SystemExit(main())
